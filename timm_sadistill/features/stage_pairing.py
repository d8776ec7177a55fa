"""How student and teacher stages pair: the ``auto`` rule across two models (docs/method.md#stage-selection); the
stages ``auto`` taps on one model are `timm_sadistill.features.model_stages`'."""
import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch.nn as nn

from ..errors import UsageError
from .input_size import resolve_img_size
from .model_stages import AUTO_MIN_MAP, AUTO_MIN_REDUCTION, StageInfo, StagesArg, auto_candidates
from .taps import FeatureTaps

__all__ = ['pair_stages']


def _nearest_reduction(reduction: int, reductions: Sequence[int]) -> int:
    """The entry of ``reductions`` closest to ``reduction`` in ratio (|log r - log reduction|); ties go to the
    smaller reduction (the larger map). 14 -> 16 among (4, 8, 16, 32)."""
    return min(reductions, key=lambda r: (abs(math.log(r / reduction)), r))


def _match_by_reduction(explicit: List[StageInfo], other: nn.Module, side: str) -> List[StageInfo]:
    """The ``auto`` stage of ``other`` for each explicit stage: equal reduction, else the nearest one."""
    candidates = {s.reduction: s for s in auto_candidates(other)}
    if not candidates:
        raise UsageError(
            f"'auto' finds no {side} stage of reduction {AUTO_MIN_REDUCTION} or more in feature_info to pair with "
            f"{[s.name for s in explicit]}; pass {{option}} explicitly.", option=f'{side}_stages',
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


def _named_once(stages: List[StageInfo], option: str) -> List[StageInfo]:
    """``stages`` as given, refused when one stage is named twice (by name, or by a name and an index): its pair would
    be distilled twice, weighing it double without a word."""
    seen = set()
    for stage in stages:
        if stage.name in seen:
            raise UsageError(f"{{option}} names stage '{stage.name}' twice ({', '.join(x.name for x in stages)}); "
                             "name each stage once.", option=option)
        seen.add(stage.name)
    return stages


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
            raise UsageError("This loss distils logits only; leave {option} and {option.teacher_stages} at 'auto'.",
                             option='student_stages')
        return [], []
    hw = resolve_img_size(img_size, student)
    taps_kwargs = dict(img_size=hw)
    if student_auto and teacher_auto:
        t_by_red = {s.reduction: s for s in auto_candidates(teacher)}
        s_by_red = {s.reduction: s for s in auto_candidates(student)}
        pairs = _auto_pairs(s_by_red, t_by_red, min(hw)) if s_by_red else []
        if not pairs:
            raise UsageError(
                f"'auto' found no student/teacher stages to pair with teacher maps of at least "
                f"{AUTO_MIN_MAP}x{AUTO_MIN_MAP} at input size {hw}: student reductions {sorted(s_by_red)}, "
                f"teacher reductions {sorted(t_by_red)}. Pass a larger {{option}}, or explicit "
                "{option.student_stages} and {option.teacher_stages} of equal length.", option='img_size',
            )
        if policy == 'last':
            pairs = pairs[-1:]
        elif policy == 'middle':
            pairs = [pairs[(len(pairs) - 1) // 2]]
        return [s for s, _ in pairs], [t for _, t in pairs]
    if student_auto:
        t = _named_once(FeatureTaps(teacher, teacher_stages, **taps_kwargs).stages, 'teacher_stages')
        return _match_by_reduction(t, student, 'student'), t
    s = _named_once(FeatureTaps(student, student_stages, **taps_kwargs).stages, 'student_stages')
    if teacher_auto:
        return s, _match_by_reduction(s, teacher, 'teacher')
    t = _named_once(FeatureTaps(teacher, teacher_stages, **taps_kwargs).stages, 'teacher_stages')
    if len(s) != len(t):
        raise UsageError(
            f"{{option}} and {{option.teacher_stages}} must have equal length to pair them, got {len(s)} "
            f"({[x.name for x in s]}) and {len(t)} ({[x.name for x in t]}); pass lists of equal length, "
            "or 'auto' on one side to match the other by reduction.", option='student_stages',
        )
    return s, t
