"""Logit knowledge distillation (Hinton, Vinyals & Dean 2015)."""
from typing import Annotated, Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from ._loss_options import NonNegative, Positive
from ._registry import register_distill_loss
from .base import DistillLoss

__all__ = ['KDLoss', 'kd_divergence']


def kd_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                  sample_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """tau^2 * KL(softmax(t / tau) || softmax(s / tau)), mean over the batch; logits (B, K), math in float32.

    ``sample_weight`` (B,) weights each sample's divergence in place of the mean's uniform 1 (it still divides by B).
    """
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if sample_weight is None:
        return F.kl_div(log_p_s, log_p_t, reduction='batchmean', log_target=True) * temperature ** 2
    per_sample = F.kl_div(log_p_s, log_p_t, reduction='none', log_target=True).sum(-1)
    return (per_sample * sample_weight.float()).mean() * temperature ** 2


@register_distill_loss('kd')
class KDLoss(DistillLoss):
    """KD: ``weight * tau^2 * KL(softmax(t/tau) || softmax(s/tau))`` on (B, K) logits, batch mean.

    Reference: Hinton et al., "Distilling the Knowledge in a Neural Network", 2015.
    Terms: ``{'kd'}``. Uses logits only (no stage taps).

    Args:
        temperature: softmax temperature of both models' logits.
        weight: weight of the KD term.
    """
    stage_policy = 'none'

    def __init__(
            self,
            student_channels: Sequence[int] = (),
            teacher_channels: Sequence[int] = (),
            temperature: Annotated[float, Positive] = 4.0,
            weight: Annotated[float, NonNegative] = 1.0,
    ):
        super().__init__(student_channels, teacher_channels)
        self.temperature = temperature
        self.weight = weight

    def forward(self, student_feats, teacher_feats, student_logits, teacher_logits,
                target: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        return {'kd': self.weight * kd_divergence(student_logits, teacher_logits, self.temperature)}
