"""The stages of one timm model: its ``feature_info`` entries as `StageInfo`, the stages a user names (a name, an
index, a submodule path), and the ones ``auto`` taps (the deepest at each reduction of 4 and up whose map is at
least 4x4; docs/method.md#stage-selection). How a student's and a teacher's stages pair is
`timm_sadistill.features.stage_pairing`'s."""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch.nn as nn
from timm.utils.model import unwrap_model

from ..errors import UsageError

__all__ = ['StageInfo', 'StagesArg', 'HEAD_INPUT', 'list_stages', 'resolve_stages', 'valid_stages_message',
           'auto_candidates', 'auto_stages', 'AUTO_MIN_MAP', 'AUTO_MIN_REDUCTION']

StagesArg = Union[str, int, Sequence[Union[str, int, 'StageInfo']]]

# the name of the stage that is the head's input, what ``forward_features`` returns (no submodule outputs it)
HEAD_INPUT = 'forward_features'
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

    Raises:
        UsageError: ``model`` is not a module (a model name: build the model first).
    """
    if not isinstance(model, nn.Module):
        hint = f"timm.create_model({model!r})" if isinstance(model, str) else 'timm.create_model(name)'
        raise UsageError(f"list_stages takes a model, not a {type(model).__name__}; pass {hint} (or run "
                         "timm-sadistill stages NAME).")
    return [
        StageInfo(name=e['module'], index=i, channels=int(e['num_chs']), reduction=int(e['reduction']))
        for i, e in enumerate(_feature_info_entries(model))
    ]


def auto_candidates(model: nn.Module) -> List[StageInfo]:
    """The deepest ``feature_info`` stage at each reduction of 4 and up, shallow to deep."""
    deepest: Dict[int, StageInfo] = {}
    for stage in list_stages(model):
        if stage.reduction >= AUTO_MIN_REDUCTION:
            deepest[stage.reduction] = stage
    return [deepest[r] for r in sorted(deepest)]


def auto_stages(model: nn.Module, img_size: Tuple[int, int]) -> List[StageInfo]:
    """The stages ``auto`` taps on one model: the deepest at each reduction of 4 and up whose map is at least 4x4 at
    ``img_size`` (H, W)."""
    stages = [s for s in auto_candidates(model) if min(img_size) // s.reduction >= AUTO_MIN_MAP]
    if not stages:
        raise UsageError(
            f"{type(unwrap_model(model)).__name__} has no stage with a map of at least "
            f"{AUTO_MIN_MAP}x{AUTO_MIN_MAP} at input size {img_size}; pass a larger {{option}} or "
            f"explicit stages ({valid_stages_message(model)}).", option='img_size',
        )
    return stages


def valid_stages_message(model: nn.Module) -> str:
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
                raise UsageError(f"Stage index {spec} is out of range; {valid_stages_message(model)}.")
            resolved.append(known[spec])
        elif spec in by_name:
            resolved.append(by_name[spec])
        elif spec == 'auto':
            raise UsageError("'auto' selects all stages and cannot be mixed with other stages; pass stages='auto'.")
        elif spec in modules and spec != '':
            resolved.append(spec)
        else:
            raise UsageError(f"Unknown stage '{spec}'; {valid_stages_message(model)}.")
    return resolved
