"""Stage taps: intermediate features of any timm model, selected by stage name, index or ``auto``.

A *stage* is an entry of the model's ``feature_info`` (``layer3``, ``stages.2``, ``blocks.5``), chosen by
module name or by index into ``feature_info`` (negative allowed; on a ResNet index 0 is ``act1``), or any
submodule path (``layer3.1.conv2``), read through a forward hook (`timm_sadistill.features.model_stages`). Features
come back as NCHW tensors: token sequences of ViT-style models become (B, C, H, W) grids without their prefix tokens.
The map a model's head takes (`HEAD_INPUT`) is tapped like a stage (`timm_sadistill.features.head_maps`).
"""
import math
from contextlib import ExitStack
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from einops import rearrange
from timm.utils.model import unwrap_model
from torch.nn.parallel import DistributedDataParallel

from ..errors import UsageError
from .head_maps import head_layout
from .input_size import resolve_img_size
from .model_stages import (
    HEAD_INPUT, StageInfo, StagesArg, auto_stages, list_stages, resolve_stages, valid_stages_message,
)

__all__ = ['FeatureTaps', 'stage_map_sizes']


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
    given. Stages from ``feature_info`` are read by one ``forward_intermediates`` call where the model has it, and
    the head's input (`HEAD_INPUT`, a stage `head_map_stage` gives) is that call's final output; other submodule
    paths (and models without ``forward_intermediates``, or wrapped in DDP, whose forward must run for gradient
    sync) are read by forward hooks that live only for the duration of the call, so copies of the module (EMA)
    never carry stale hooks, and the head's input there by catching the argument of ``forward_head``.

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
            resolved: List[Union[StageInfo, str]] = list(auto_stages(model, self.img_size))
        else:
            resolved = resolve_stages(model, stages)
        base = unwrap_model(model)
        self.use_hooks = (
            # a path outside feature_info, given as a string or as the StageInfo of one (index None, as a task
            # passes the stages pair_stages resolved) has no index for forward_intermediates
            any(isinstance(s, str) or (s.index is None and s.name != HEAD_INPUT) for s in resolved)
            # nor does the head's input alone, and forward_intermediates takes no empty list of indices
            or all(s.index is None for s in resolved)
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
            return x.permute(0, 3, 1, 2) if head_layout(base) == 'NHWC' else x
        raise UsageError(
            f"Stage '{name}' of {type(base).__name__} outputs shape {tuple(x.shape)}, not a feature map or token "
            f"sequence; pick another stage ({valid_stages_message(self.model)})."
        )

    def _run_with_hooks(self, runner: nn.Module, x: torch.Tensor, paths: List[str]):
        base = unwrap_model(self.model)
        modules = dict(base.named_modules())
        captured: Dict[str, torch.Tensor] = {}

        def hook_for(path):
            def hook(_module, _args, output):
                captured[path] = output
            return hook

        with ExitStack() as stack:
            for path in dict.fromkeys(paths):
                if path != HEAD_INPUT:
                    stack.callback(modules[path].register_forward_hook(hook_for(path)).remove)
            if HEAD_INPUT in paths:
                # no module outputs the head's input, and only the runner's forward may run (DDP syncs gradients
                # in it): an instance attribute shadows forward_head for this call and catches its argument
                forward_head = base.forward_head

                def catch_head_input(features, *args, **kwargs):
                    captured[HEAD_INPUT] = features
                    return forward_head(features, *args, **kwargs)

                base.forward_head = catch_head_input
                stack.callback(vars(base).pop, 'forward_head')
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
        indices = sorted({s.index for s in self.stages if s.index is not None})
        final, intermediates = base.forward_intermediates(x, indices=indices, output_fmt='NCHW')
        by_index = dict(zip(indices, intermediates))
        # here only HEAD_INPUT has no index: the final output, forward_features' in the model's layout
        return base.forward_head(final), [
            by_index[s.index] if s.index is not None else self._to_nchw(final, (x.shape[-2], x.shape[-1]), s.name)
            for s in self.stages
        ]


def stage_map_sizes(model: nn.Module, img_size: Tuple[int, int]) -> Dict[int, Tuple[int, int]]:
    """{stage index: (H, W)} of every ``feature_info`` stage, measured by one forward pass of a zero image.

    Measured rather than computed as size // reduction, because padding and odd sizes round differently per model;
    keyed by index, because stages may share a module name (CoaT's parallel_blocks is three stages).
    """
    stages = list_stages(model)
    if not stages:
        return {}
    taps = FeatureTaps(model, [s.index for s in stages], img_size=img_size)
    model.eval()
    with torch.no_grad():
        _, feats = taps(torch.zeros(1, int(getattr(model, 'in_chans', 3)), *img_size))
    return {s.index: tuple(f.shape[-2:]) for s, f in zip(stages, feats)}
