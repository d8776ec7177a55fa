"""Decoupled knowledge distillation (Zhao et al., CVPR 2022)."""
from typing import Annotated, Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import UsageError
from ._loss_options import NonNegative, Positive
from ._registry import register_distill_loss
from .base import DistillLoss, label_indices

__all__ = ['DKDLoss']


@register_distill_loss('dkd')
class DKDLoss(DistillLoss):
    """DKD: ``alpha * TCKD + beta * NCKD`` on (B, K) logits with labels y (B,).

    TCKD = tau^2 * KL([p^T_y, 1 - p^T_y] || [p^S_y, 1 - p^S_y]) (binary target vs rest, batch mean);
    NCKD = tau^2 * KL(p^T_{k != y} || p^S_{k != y}) over the non-target classes renormalised (batch mean),
    with p = softmax(logits / tau). Soft (B, K) targets (mixup/cutmix) use their argmax as y. The authors'
    linear warm-up of the loss weight over the first epochs is left to the training schedule.

    Reference: Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022 (defaults alpha 1, beta 8, tau 4).
    Terms: ``{'dkd_tckd', 'dkd_nckd'}``. Needs ``target``.

    Args:
        alpha: weight of the target-class term (TCKD).
        beta: weight of the non-target-class term (NCKD).
        temperature: softmax temperature of both models' logits.
    """
    stage_policy = 'none'

    def __init__(
            self,
            student_channels: Sequence[int] = (),
            teacher_channels: Sequence[int] = (),
            alpha: Annotated[float, NonNegative] = 1.0,
            beta: Annotated[float, NonNegative] = 8.0,
            temperature: Annotated[float, Positive] = 4.0,
    ):
        super().__init__(student_channels, teacher_channels)
        self.alpha = alpha
        self.beta = beta
        self.temperature = temperature

    def forward(self, student_feats, teacher_feats, student_logits, teacher_logits,
                target: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        if target is None:
            raise UsageError("DKD needs the labels: pass target=(B,) class indices (the task passes its target).")
        labels = label_indices(target)
        tau = self.temperature
        s = student_logits.float() / tau
        t = teacher_logits.float() / tau
        gt = F.one_hot(labels.long(), s.shape[-1]).bool()
        p_s, p_t = s.softmax(-1), t.softmax(-1)
        binary_s = torch.stack([(p_s * gt).sum(-1), (p_s * ~gt).sum(-1)], dim=-1)
        binary_t = torch.stack([(p_t * gt).sum(-1), (p_t * ~gt).sum(-1)], dim=-1)
        tckd = F.kl_div(binary_s.clamp_min(1e-12).log(), binary_t, reduction='batchmean') * tau ** 2
        # The authors subtract 1000 from the target logit; masking it out exactly avoids float32 cancellation.
        log_q_s = s.masked_fill(gt, float('-inf')).log_softmax(dim=-1)
        log_q_t = t.masked_fill(gt, float('-inf')).log_softmax(dim=-1)
        log_ratio = torch.where(gt, torch.zeros_like(log_q_t), log_q_t - log_q_s)
        nckd = (log_q_t.exp() * log_ratio).sum(-1).mean() * tau ** 2
        return {'dkd_tckd': self.alpha * tckd, 'dkd_nckd': self.beta * nckd}
