"""Stage taps: intermediate features of any timm model, selected by stage name, index or ``auto``.

A *stage* is an entry of the model's ``feature_info`` (``layer3``, ``stages.2``, ``blocks.5``), chosen by
module name or by index into ``feature_info`` (negative allowed; on a ResNet index 0 is ``act1``), or any
submodule path (``layer3.1.conv2``), read through a forward hook. Features come back as NCHW tensors:
token sequences of ViT-style models become (B, C, H, W) grids without their prefix tokens.
"""
import math
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from einops import rearrange
from timm.models import get_pretrained_cfg
from timm.utils.model import unwrap_model
from torch.nn.parallel import DistributedDataParallel

from .errors import UsageError

__all__ = [
    'StageInfo', 'FeatureTaps', 'list_stages', 'resolve_stages', 'pair_stages', 'default_img_size',
    'resolve_img_size', 'input_size_kwargs', 'check_input_size', 'AUTO_MIN_MAP', 'AUTO_MIN_REDUCTION',
]

StagesArg = Union[str, int, Sequence[Union[str, int, 'StageInfo']]]

AUTO_MIN_MAP = 4  # `auto` keeps pairs whose teacher map is at least this many positions per side
AUTO_MIN_REDUCTION = 4  # the stride-2 stem is not a stage worth distilling: `auto` starts at reduction 4


@dataclass(frozen=True)
class StageInfo:
    """One selectable stage. ``index`` counts into ``feature_info``; it is None for a hooked submodule path."""
    name: str
    index: Optional[int]
    channels: int
    reduction: int


def _feature_info_entries(model: nn.Module) -> List[dict]:
    info = getattr(unwrap_model(model), 'feature_info', None)
    if info is None:
        return []
    return list(info.info) if hasattr(info, 'info') else list(info)


def list_stages(model: nn.Module) -> List[StageInfo]:
    """Name, index, channels and reduction of each ``feature_info`` stage of a timm model.

    Works through DDP, ``torch.compile`` and EMA wrappers.
    """
    return [
        StageInfo(name=e['module'], index=i, channels=int(e['num_chs']), reduction=int(e['reduction']))
        for i, e in enumerate(_feature_info_entries(model))
    ]


def default_img_size(model: nn.Module) -> Tuple[int, int]:
    """(H, W) of the model's default input: the size a patch model was built for, else its ``pretrained_cfg``'s
    (224 x 224 when it has none).

    A ViT built with ``timm.create_model(name, img_size=64)`` keeps 224 in its ``pretrained_cfg``; its patch
    embedding knows the size it takes.
    """
    base = unwrap_model(model)
    built = getattr(getattr(base, 'patch_embed', None), 'img_size', None)
    if built is not None:
        return int(built[0]), int(built[1])
    cfg = getattr(base, 'pretrained_cfg', None) or {}
    size = cfg.get('test_input_size') or cfg.get('input_size') or (3, 224, 224)
    return int(size[-2]), int(size[-1])


def resolve_img_size(
        img_size: Optional[Union[int, Sequence[int]]],
        model: Optional[nn.Module] = None,
) -> Tuple[int, int]:
    """(H, W) of an input size given as N or (..., H, W); None: the default size of ``model``."""
    if img_size is None:
        return default_img_size(model)
    if isinstance(img_size, int):
        return img_size, img_size
    return int(img_size[-2]), int(img_size[-1])


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
        UsageError: naming ``option`` (the caller's word for the size: ``img_size`` or ``--img-size``) and the fix.
    """
    embed = getattr(unwrap_model(model), 'patch_embed', None)
    patch = getattr(embed, 'patch_size', None)
    if patch is None:
        return
    name = type(unwrap_model(model)).__name__
    built = getattr(embed, 'img_size', None)
    if getattr(embed, 'strict_img_size', False) and built is not None and tuple(built) != tuple(img_size):
        raise UsageError(
            f"The {role} ({name}) was built for {built[0]}x{built[1]} inputs, not {option} {img_size[0]}x{img_size[1]}; "
            f"build it for that size: timm.create_model(name, img_size={img_size[0]}) (or dynamic_img_size=True)."
        )
    if not getattr(embed, 'dynamic_img_pad', False) and (img_size[0] % patch[0] or img_size[1] % patch[1]):
        raise UsageError(
            f"{option} {img_size[0]}x{img_size[1]} is not a multiple of the {role}'s patch size "
            f"{patch[0]}x{patch[1]} ({name}); use a multiple of {patch[0]}, e.g. {max(1, round(img_size[0] / patch[0])) * patch[0]}."
        )




def _valid_names_message(model: nn.Module) -> str:
    stages = list_stages(model)
    if not stages:
        return "this model has no feature_info: pass submodule paths such as 'layer3' (see model.named_modules())"
    listed = ', '.join(f"'{s.name}' ({s.index})" for s in stages)
    return (
        f"valid stages of {type(unwrap_model(model)).__name__} are {listed} "
        f"(names, or their indices into feature_info, negative allowed), or any submodule path"
    )


def resolve_stages(model: nn.Module, stages: StagesArg) -> List[Union[StageInfo, str]]:
    """Turn names and indices into `StageInfo`s (kept as they are); paths outside ``feature_info`` stay strings.

    Raises:
        UsageError: for an unknown name, an index out of range or a value that is neither, listing the valid stages.
    """
    if isinstance(stages, (str, int)):
        stages = [stages]
    known = list_stages(model)
    by_name = {s.name: s for s in known}
    modules = dict(unwrap_model(model).named_modules())
    resolved: List[Union[StageInfo, str]] = []
    for spec in stages:
        if isinstance(spec, StageInfo):
            resolved.append(spec)
            continue
        if isinstance(spec, bool) or not isinstance(spec, (str, int)):
            raise UsageError(f"A stage is a name (str) or an index (int) into feature_info, got {spec!r}.")
        if isinstance(spec, int):
            if not -len(known) <= spec < len(known):
                raise UsageError(f"Stage index {spec} is out of range; {_valid_names_message(model)}.")
            resolved.append(known[spec])
        elif spec in by_name:
            resolved.append(by_name[spec])
        elif spec == 'auto':
            raise UsageError("'auto' selects all stages and cannot be mixed with other stages; pass stages='auto'.")
        elif spec in modules and spec != '':
            resolved.append(spec)
        else:
            raise UsageError(f"Unknown stage '{spec}'; {_valid_names_message(model)}.")
    return resolved


def _auto_candidates(model: nn.Module) -> List[StageInfo]:
    """The deepest ``feature_info`` stage at each reduction of 4 and up, shallow to deep."""
    deepest: Dict[int, StageInfo] = {}
    for stage in list_stages(model):
        if stage.reduction >= AUTO_MIN_REDUCTION:
            deepest[stage.reduction] = stage
    return [deepest[r] for r in sorted(deepest)]


def _tokens_to_grid(tokens: torch.Tensor, model: nn.Module, input_hw: Tuple[int, int]) -> torch.Tensor:
    """(B, prefix + H*W, C) token sequence -> (B, C, H, W) grid without prefix tokens."""
    prefix = int(getattr(model, 'num_prefix_tokens', 0))
    patch_embed = getattr(model, 'patch_embed', None)
    num_patches = tokens.shape[1] - prefix
    if patch_embed is not None and hasattr(patch_embed, 'dynamic_feat_size'):
        grid_h, grid_w = patch_embed.dynamic_feat_size(input_hw)
    else:
        grid_h = grid_w = math.isqrt(num_patches)
    if grid_h * grid_w != num_patches:
        raise UsageError(
            f"Cannot lay {num_patches} tokens of {type(model).__name__} out as a grid; "
            "tap a stage listed in feature_info instead."
        )
    return rearrange(tokens[:, prefix:], 'b (h w) c -> b c h w', h=grid_h, w=grid_w)


class FeatureTaps(nn.Module):
    """A timm model that returns its logits and the features of chosen stages.

    ``logits, feats = taps(x)``: ``feats`` is a list of (B, C_k, H_k, W_k) tensors, one per stage, in the order
    given. Stages from ``feature_info`` are read by one ``forward_intermediates`` call where the model has it; other
    submodule paths (and models without ``forward_intermediates``, or wrapped in DDP, whose forward must run for
    gradient sync) are read by forward hooks that live only for the duration of the call, so copies of the module
    (EMA) never carry stale hooks.

    Args:
        model: a timm model, possibly wrapped by DDP, ``torch.compile`` or an EMA.
        stages: names, indices into ``feature_info`` (negative allowed), submodule paths, or ``'auto'``
            (the deepest stage at each reduction >= 4 whose map is at least 4x4 at ``img_size``).
        img_size: input size used by ``'auto'`` and to probe hooked submodules (default: the model's).
    """

    def __init__(
            self,
            model: nn.Module,
            stages: StagesArg = 'auto',
            img_size: Optional[Union[int, Sequence[int]]] = None,
    ):
        super().__init__()
        self.model = model
        self.img_size = resolve_img_size(img_size, model)
        if isinstance(stages, str) and stages == 'auto':
            resolved: List[Union[StageInfo, str]] = [
                s for s in _auto_candidates(model) if min(self.img_size) // s.reduction >= AUTO_MIN_MAP
            ]
            if not resolved:
                raise UsageError(
                    f"{type(unwrap_model(model)).__name__} has no stage with a map of at least "
                    f"{AUTO_MIN_MAP}x{AUTO_MIN_MAP} at input size {self.img_size}; pass a larger img_size or "
                    f"explicit stages ({_valid_names_message(model)})."
                )
        else:
            resolved = resolve_stages(model, stages)
        base = unwrap_model(model)
        self.use_hooks = (
            # a path outside feature_info, given as a string or as the StageInfo of one (index None, as a task
            # passes the stages pair_stages resolved) has no index for forward_intermediates
            any(isinstance(s, str) or s.index is None for s in resolved)
            or not hasattr(base, 'forward_intermediates')
            or isinstance(model, DistributedDataParallel)
        )
        self.stages: List[StageInfo] = self._complete_hooked(resolved) if resolved else []

    @property
    def channels(self) -> List[int]:
        return [s.channels for s in self.stages]

    @property
    def reductions(self) -> List[int]:
        return [s.reduction for s in self.stages]

    @property
    def names(self) -> List[str]:
        return [s.name for s in self.stages]

    def _complete_hooked(self, resolved: List[Union[StageInfo, str]]) -> List[StageInfo]:
        """Fill in channels and reduction of hooked submodule paths with one probe forward."""
        paths = [s for s in resolved if isinstance(s, str)]
        if not paths:
            return list(resolved)
        base = unwrap_model(self.model)
        in_chans = int(getattr(base, 'in_chans', 3))
        param = next(base.parameters(), None)
        probe = torch.zeros(1, in_chans, *self.img_size,
                            device=param.device if param is not None else None,
                            dtype=param.dtype if param is not None else None)
        was_training = base.training
        base.eval()  # a probe must not move BatchNorm running statistics
        try:
            with torch.no_grad():
                _, feats = self._run_with_hooks(base, probe, paths)
        finally:
            base.train(was_training)
        found = {
            path: StageInfo(name=path, index=None, channels=f.shape[1], reduction=max(1, round(self.img_size[0] / f.shape[2])))
            for path, f in zip(paths, feats)
        }
        return [found[s] if isinstance(s, str) else s for s in resolved]

    def _to_nchw(self, x: torch.Tensor, input_hw: Tuple[int, int], name: str) -> torch.Tensor:
        base = unwrap_model(self.model)
        if isinstance(x, (tuple, list)):
            x = x[0]
        if x.dim() == 3:
            return _tokens_to_grid(x, base, input_hw)
        if x.dim() == 4:
            return x.permute(0, 3, 1, 2) if getattr(base, 'output_fmt', 'NCHW') == 'NHWC' else x
        raise UsageError(
            f"Stage '{name}' of {type(base).__name__} outputs shape {tuple(x.shape)}, not a feature map or token "
            f"sequence; pick another stage ({_valid_names_message(self.model)})."
        )

    def _run_with_hooks(self, runner: nn.Module, x: torch.Tensor, paths: List[str]):
        modules = dict(unwrap_model(self.model).named_modules())
        captured: Dict[str, torch.Tensor] = {}

        def hook_for(path):
            def hook(_module, _args, output):
                captured[path] = output
            return hook

        with ExitStack() as stack:
            for path in dict.fromkeys(paths):
                stack.callback(modules[path].register_forward_hook(hook_for(path)).remove)
            logits = runner(x)
        missing = [p for p in paths if p not in captured]
        if missing:
            raise RuntimeError(f"Stages {missing} did not run in the forward pass of {type(unwrap_model(self.model)).__name__}.")
        input_hw = (x.shape[-2], x.shape[-1])
        return logits, [self._to_nchw(captured[p], input_hw, p) for p in paths]

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """x: (B, C_in, H, W) -> (logits (B, num_classes), [(B, C_k, H_k, W_k) per stage])."""
        if not self.stages:
            return self.model(x), []
        if self.use_hooks:
            return self._run_with_hooks(self.model, x, self.names)
        base = unwrap_model(self.model)
        indices = sorted({s.index for s in self.stages})
        final, intermediates = base.forward_intermediates(x, indices=indices, output_fmt='NCHW')
        by_index = dict(zip(indices, intermediates))
        return base.forward_head(final), [by_index[s.index] for s in self.stages]


def _nearest_reduction(reduction: int, reductions: Sequence[int]) -> int:
    """The entry of ``reductions`` closest to ``reduction`` in ratio (|log r - log reduction|); ties go to the
    smaller reduction (the larger map). 14 -> 16 among (4, 8, 16, 32)."""
    return min(reductions, key=lambda r: (abs(math.log(r / reduction)), r))


def _match_by_reduction(explicit: List[StageInfo], other: nn.Module, side: str) -> List[StageInfo]:
    """The ``auto`` stage of ``other`` for each explicit stage: equal reduction, else the nearest one."""
    candidates = {s.reduction: s for s in _auto_candidates(other)}
    if not candidates:
        raise UsageError(
            f"'auto' finds no {side} stage of reduction {AUTO_MIN_REDUCTION} or more in feature_info to pair with "
            f"{[s.name for s in explicit]}; pass {side}_stages explicitly."
        )
    return [candidates[_nearest_reduction(stage.reduction, list(candidates))] for stage in explicit]


def _auto_pairs(
        s_by_red: Dict[int, StageInfo],
        t_by_red: Dict[int, StageInfo],
        min_side: int,
) -> List[Tuple[StageInfo, StageInfo]]:
    """(student, teacher) ``auto`` pairs, shallow to deep, whose teacher map is at least 4x4 at an input of
    ``min_side`` pixels: the stages of equal reduction; when the models share no reduction at all (a patch-14 ViT
    against a CNN), the mutually nearest reductions (each is the other's `_nearest_reduction`), so that every
    stage is used at most once; the connector then resizes the student map to the teacher's."""
    kept = {r: t for r, t in t_by_red.items() if min_side // r >= AUTO_MIN_MAP}
    if any(r in s_by_red for r in t_by_red):
        return [(s_by_red[r], kept[r]) for r in sorted(kept) if r in s_by_red]
    pairs = []
    for rt in sorted(kept):
        rs = _nearest_reduction(rt, list(s_by_red))
        if _nearest_reduction(rs, list(kept)) == rt:
            pairs.append((s_by_red[rs], kept[rt]))
    return pairs


def pair_stages(
        student: nn.Module,
        teacher: nn.Module,
        student_stages: StagesArg = 'auto',
        teacher_stages: StagesArg = 'auto',
        img_size: Optional[Union[int, Sequence[int]]] = None,
        policy: str = 'all',
) -> Tuple[List[StageInfo], List[StageInfo]]:
    """Pair student and teacher stages for feature distillation.

    ``auto`` on both sides pairs the deepest stage of each reduction that both models have (so a 4-stage ResNet
    pairs with a 12-block ViT at reduction 16) and keeps the pairs whose teacher map is at least 4x4 at
    ``img_size`` (default: the student's input size). Where no reduction is shared (a patch-14 ViT against a
    CNN), the mutually nearest reductions pair (14 with 16) and the student map is resized to the teacher's
    (docs/method.md#stage-selection). ``auto`` on one side matches the other side's reductions, or the nearest.
    Explicit lists must have equal lengths. ``policy`` picks among auto pairs: ``'all'``, ``'last'``, ``'middle'``
    or ``'none'`` (a loss on logits only).

    Returns:
        (student stages, teacher stages), equal-length lists of `StageInfo`.
    """
    if policy not in ('all', 'last', 'middle', 'none'):
        raise ValueError(f"Unknown stage policy '{policy}'; use 'all', 'last', 'middle' or 'none'.")
    student_auto = isinstance(student_stages, str) and student_stages == 'auto'
    teacher_auto = isinstance(teacher_stages, str) and teacher_stages == 'auto'
    if policy == 'none':
        if not (student_auto and teacher_auto):
            raise UsageError("This loss distils logits only; leave student_stages and teacher_stages at 'auto'.")
        return [], []
    hw = resolve_img_size(img_size, student)
    taps_kwargs = dict(img_size=hw)
    if student_auto and teacher_auto:
        t_by_red = {s.reduction: s for s in _auto_candidates(teacher)}
        s_by_red = {s.reduction: s for s in _auto_candidates(student)}
        pairs = _auto_pairs(s_by_red, t_by_red, min(hw)) if s_by_red else []
        if not pairs:
            raise UsageError(
                f"'auto' found no student/teacher stages to pair with teacher maps of at least "
                f"{AUTO_MIN_MAP}x{AUTO_MIN_MAP} at input size {hw}: student reductions {sorted(s_by_red)}, "
                f"teacher reductions {sorted(t_by_red)}. Pass a larger img_size, or explicit "
                f"student_stages and teacher_stages of equal length."
            )
        if policy == 'last':
            pairs = pairs[-1:]
        elif policy == 'middle':
            pairs = [pairs[(len(pairs) - 1) // 2]]
        return [s for s, _ in pairs], [t for _, t in pairs]
    if student_auto:
        t = FeatureTaps(teacher, teacher_stages, **taps_kwargs).stages
        return _match_by_reduction(t, student, 'student'), t
    s = FeatureTaps(student, student_stages, **taps_kwargs).stages
    if teacher_auto:
        return s, _match_by_reduction(s, teacher, 'teacher')
    t = FeatureTaps(teacher, teacher_stages, **taps_kwargs).stages
    if len(s) != len(t):
        raise UsageError(
            f"student_stages and teacher_stages must have equal length to pair them, got {len(s)} "
            f"({[x.name for x in s]}) and {len(t)} ({[x.name for x in t]}); pass lists of equal length, "
            "or 'auto' on one side to match the other by reduction."
        )
    return s, t
