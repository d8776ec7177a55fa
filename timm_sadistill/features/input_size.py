"""Input sizes: the (H, W) a model takes by default, the keywords that build a fixed-size model (ViT, Swin) for
another size, and the check that a patch model can take a size at all."""
from numbers import Integral
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch.nn as nn
from timm.models import get_pretrained_cfg
from timm.utils.model import unwrap_model

from ..errors import UsageError

__all__ = ['default_img_size', 'resolve_img_size', 'input_size_kwargs', 'check_input_size']


def _pair(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    """(H, W) of a size timm keeps as N or (H, W)."""
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def default_img_size(model: nn.Module) -> Tuple[int, int]:
    """(H, W) of the model's default input: the size a patch model was built for, else its ``pretrained_cfg``'s
    (224 x 224 when it has none).

    A ViT built with ``timm.create_model(name, img_size=64)`` keeps 224 in its ``pretrained_cfg``; its patch
    embedding knows the size it takes.
    """
    base = unwrap_model(model)
    built = getattr(getattr(base, 'patch_embed', None), 'img_size', None)
    if built is not None:
        return _pair(built)
    cfg = getattr(base, 'pretrained_cfg', None) or {}
    size = cfg.get('test_input_size') or cfg.get('input_size') or (3, 224, 224)
    return int(size[-2]), int(size[-1])


def resolve_img_size(
        img_size: Optional[Union[int, Sequence[int]]],
        model: Optional[nn.Module] = None,
) -> Tuple[int, int]:
    """(H, W) of an input size given as N or (..., H, W); None: the default size of ``model``.

    Raises:
        UsageError: a size that is not a positive int or a sequence of them (a string '64' would read as (6, 4)).
    """
    if img_size is None:
        return default_img_size(model)
    if isinstance(img_size, Integral) and not isinstance(img_size, bool):
        hw = (int(img_size), int(img_size))
    elif isinstance(img_size, (str, bytes)) or not isinstance(img_size, Sequence) or len(img_size) < 2 \
            or not all(isinstance(x, Integral) and not isinstance(x, bool) for x in img_size[-2:]):
        raise UsageError(f"{{option}} is N or (H, W) in pixels, as ints, got {img_size!r}; e.g. {{option:64}}.",
                         option='img_size')
    else:
        hw = (int(img_size[-2]), int(img_size[-1]))
    if min(hw) <= 0:
        raise UsageError(f"{{option}} {hw[0]}x{hw[1]}: an input size is a positive number of pixels, "
                         "e.g. {option:64}.", option='img_size')
    return hw


def input_size_kwargs(name: str, img_size: Optional[Union[int, Sequence[int]]]) -> Dict[str, Any]:
    """``timm.create_model(name, **input_size_kwargs(name, 64))`` builds model ``name`` for inputs of ``img_size``.

    Models whose ``pretrained_cfg`` has ``fixed_input_size`` (ViT, Swin, EVA...) take an ``img_size`` argument that
    their position embeddings and windows depend on (timm resamples pretrained position embeddings to it on load);
    other models take any size, and no such argument. None gives no arguments (the model's default size).
    """
    cfg = get_pretrained_cfg(name)
    if img_size is None or cfg is None or not cfg.fixed_input_size:
        return {}
    return {'img_size': resolve_img_size(img_size)}


def check_input_size(model: nn.Module, img_size: Tuple[int, int], option: str = 'img_size', role: str = 'model') -> None:
    """Refuse an input size (H, W) a patch model cannot take, before anything runs.

    A model built for a fixed size (timm's ``strict_img_size``) takes only that size; otherwise, unless it pads
    (``dynamic_img_pad``), H and W must be multiples of its patch size.

    Raises:
        UsageError: carrying ``option`` (the size's name: ``img_size``, which the command line words as its flag,
            or the caller's own word) and the fix.
    """
    embed = getattr(unwrap_model(model), 'patch_embed', None)
    patch = getattr(embed, 'patch_size', None)
    if patch is None:
        return
    patch = _pair(patch)  # a ViT keeps (h, w), XCiT a single int
    name = type(unwrap_model(model)).__name__
    built = getattr(embed, 'img_size', None)
    built = _pair(built) if built is not None else None
    if getattr(embed, 'strict_img_size', False) and built is not None and tuple(built) != tuple(img_size):
        raise UsageError(
            f"The {role} ({name}) was built for {built[0]}x{built[1]} inputs, not {{option}} {img_size[0]}x{img_size[1]}; "
            f"build it for that size: timm.create_model(name, img_size={img_size[0]}) (or dynamic_img_size=True).",
            option=option,
        )
    if not getattr(embed, 'dynamic_img_pad', False) and (img_size[0] % patch[0] or img_size[1] % patch[1]):
        raise UsageError(
            f"{{option}} {img_size[0]}x{img_size[1]} is not a multiple of the {role}'s patch size "
            f"{patch[0]}x{patch[1]} ({name}); use a multiple of {patch[0]}, e.g. {max(1, round(img_size[0] / patch[0])) * patch[0]}.",
            option=option,
        )
