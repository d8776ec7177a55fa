"""The `DistillLoss` base class every distillation loss derives from."""
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..errors import UsageError

__all__ = ['DistillLoss', 'TASK_FILLED', 'label_indices', 'top1_hits']

# the keywords a task fills in from its taps (the channels of each stage pair, and whether the last pair is the maps
# the heads take, for a loss that `uses_final_pair`): not options, so no flag, not recorded, not compared on resume
TASK_FILLED = ('student_channels', 'teacher_channels', 'head_maps')


def label_indices(target: torch.Tensor) -> torch.Tensor:
    """(B,) class indices of a target: labels (B,) as they are, soft targets (B, K) (mixup, label smoothing) their top
    class."""
    return target.argmax(dim=-1) if target.dim() == 2 else target.long()


def top1_hits(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) float: 1 where the top class of logits (B, K) is the sample's label (`label_indices`), else 0."""
    return (logits.detach().argmax(dim=-1) == label_indices(target)).float()


def _refuse_an_empty_batch(loss: 'DistillLoss', inputs: tuple) -> None:
    """A forward pre-hook of every loss: a batch of no samples has no mean (the logit losses would return NaN), so it
    is refused before any term runs."""
    student_feats, _, student_logits, *_ = inputs
    first = student_logits if student_logits is not None else next(iter(student_feats), None)
    if first is not None and first.shape[0] == 0:
        raise UsageError(f"{type(loss).__name__} got an empty batch (0 samples), whose mean is undefined; skip empty "
                         "batches (e.g. drop_last=True in the DataLoader).")


class DistillLoss(nn.Module):
    """Base of all distillation losses.

    A loss is called with the five inputs below and returns a dict of named, already weighted scalar terms whose
    sum is its loss. Its connectors (student -> teacher projections) are submodules built in ``__init__`` from
    the channel counts, so they train with the student and are saved with the task.

    ``forward(student_feats, teacher_feats, student_logits, teacher_logits, target=None)``:
        student_feats: list of (B, Cs_k, Hs_k, Ws_k), one per distilled stage pair k.
        teacher_feats: list of (B, Ct_k, Ht_k, Wt_k), same length.
        student_logits, teacher_logits: (B, K), or None for a loss that reads no logits (the feature-only losses:
            AT, FitNet, CWD, and SA with ``kd_weight=0``), e.g. when distilling a backbone without a head.
        target: (B,) class indices or (B, K) soft targets; only losses that need labels read it.

    What a loss needs from the models it declares here, and the task (`timm_sadistill.tasks.DistillTask`) asks
    only this, never a loss's name:

    * ``stage_policy``: which stage pairs ``auto`` gives it: ``'all'``, ``'last'``, ``'middle'`` or ``'none'``
      (logits only: no features are tapped at all).
    * `compares_logits`: whether, with given options, it compares the two models' logits (their class counts must
      then match); `feature_only_options`: the options with which it compares none.
    * `uses_final_pair`: whether it takes the maps the heads take as an extra last stage pair, built with the
      keyword ``head_maps=True`` (the instance attribute ``head_maps`` says whether it was); `without_final_pair`:
      its options for a pair of models whose heads take no maps.
    * ``draws_attention_maps``: whether its stage pairs can be drawn as attention-map pictures
      (`timm_sadistill.attention_maps`: ``--save-attention-maps``, ``timm-sadistill viz``).
    * `bind`: called once with the two models, for a loss that runs them (their heads), and the teacher's classes
      that are the student's when the teacher knows more.

    ``loss_name`` is the registry name, set by `register_distill_loss`.

    A loss's options are its constructor's keyword parameters after the channel counts, each typed, defaulted and
    documented in ``Args:`` (see `timm_sadistill.losses._registry`); a registered loss checks them when built and
    keeps them, defaults included, as ``option_values``.
    """
    stage_policy: ClassVar[str] = 'all'
    draws_attention_maps: ClassVar[bool] = False
    loss_name: ClassVar[str] = ''
    head_maps: bool = False

    def __init__(self, student_channels: Sequence[int] = (), teacher_channels: Sequence[int] = ()):
        super().__init__()
        if len(student_channels) != len(teacher_channels):
            raise UsageError(
                f"student_channels and teacher_channels must have one entry per stage pair, got "
                f"{list(student_channels)} and {list(teacher_channels)}."
            )
        if self.stage_policy != 'none' and not student_channels:
            raise UsageError(
                f"{type(self).__name__} distils features: pass student_channels and teacher_channels, one per "
                "stage pair (a task fills them in from its stage taps)."
            )
        self.student_channels: List[int] = [int(c) for c in student_channels]
        self.teacher_channels: List[int] = [int(c) for c in teacher_channels]
        self.register_forward_pre_hook(_refuse_an_empty_batch)

    @classmethod
    def uses_final_pair(cls, **options) -> bool:
        """Whether a loss built with ``options`` wants the maps the models' heads take (the task's
        `timm_sadistill.features.head_map_stage`) as its last stage pair. A task that taps them builds the loss with
        ``head_maps=True``; such a loss takes ``head_maps`` as a keyword (`TASK_FILLED`)."""
        return False

    @classmethod
    def without_final_pair(cls, why: str, **options) -> Tuple[Dict[str, Any], str]:
        """For a pair whose heads take no map (``why`` says which, in a phrase): ``options`` with the terms that need
        the final pair turned off, and a one-line notice saying so. The task calls it before it builds the loss,
        when ``uses_final_pair(**options)``; a term that may not be turned off for the user raises UsageError.

        The base loss turns nothing off: a loss that uses the final pair and does not override this is refused.
        """
        raise UsageError(f"{cls.__name__} distils the maps the models' heads take, but {why}; "
                         "distil models whose heads take (B, C, H, W) feature maps.")

    @classmethod
    def compares_logits(cls, **options) -> bool:
        """Whether a loss built with ``options`` compares student and teacher logits (they must have equal class
        counts). Losses on logits only do; feature losses do not."""
        return cls.stage_policy == 'none'

    @classmethod
    def feature_only_options(cls) -> Optional[Dict[str, Any]]:
        """The options with which a task's loss compares no logits, so that it distils models of different class
        counts: ``{}`` when its defaults do not compare them, None when no options make it feature-only. The task's
        refusal of other class counts names these losses."""
        return None if cls.compares_logits() else {}

    def bind(self, student: nn.Module, teacher: nn.Module, teacher_classes: Optional[torch.Tensor] = None) -> None:
        """Called once by the task with the bare student and teacher, before any optimizer exists (no-op here).

        ``teacher_classes``: for a teacher distilled on some of its classes (the task's ``teacher_classes``), the (K,)
        long indices of its classes that are the student's, in the student's order; the task passes it only then. The
        teacher logits a loss is given are restricted to them already; a loss that runs the teacher's head itself
        restricts what the head gives, as the task does (indices into its last dimension of classes)."""

    def reports(self) -> Dict[str, torch.Tensor]:
        """Scalars (0-dim tensors) that describe the last forward and are not terms of the loss (what a gate
        decided): the task returns them beside the terms, outside ``kd_loss``, and a run logs them each epoch
        (summary.csv ``train_<name>``). None here."""
        return {}

    def check_features(self, student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor]) -> None:
        """Raise a clear error when the features do not match the channels this loss was built for."""
        got_s = [f.shape[1] for f in student_feats]
        got_t = [f.shape[1] for f in teacher_feats]
        if got_s != self.student_channels or got_t != self.teacher_channels:
            raise UsageError(
                f"{type(self).__name__} was built for student channels {self.student_channels} and teacher channels "
                f"{self.teacher_channels}, got features with {got_s} and {got_t}."
            )

    def forward(
            self,
            student_feats: Sequence[torch.Tensor],
            teacher_feats: Sequence[torch.Tensor],
            student_logits: Optional[torch.Tensor],
            teacher_logits: Optional[torch.Tensor],
            target: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        raise NotImplementedError
