"""DIST: distillation by correlation of class probabilities (Huang et al., NeurIPS 2022)."""
from typing import Annotated, Dict, Optional, Sequence, Tuple

import torch

from ._loss_options import Positive
from ._registry import register_distill_loss
from .base import DistillLoss

__all__ = ['DISTLoss', 'dist_relations']


def _pearson(a: torch.Tensor, b: torch.Tensor, dim: int, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of a and b along ``dim``; 0 where either side is constant (eps keeps it finite)."""
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    return (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim) + eps)


def dist_relations(
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        temperature: float,
        sample_weight: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """DIST's (L_inter, L_intra) of (B, K) logits, each scaled by tau^2; math in float32.

    With p = softmax(z / tau): L_inter = tau^2 * 1/B * sum_b (1 - pearson_k(p^S_b, p^T_b)) and
    L_intra = tau^2 * 1/K * sum_k (1 - pearson_b(p^S_{:,k}, p^T_{:,k})). One sample (B = 1) has no across-batch
    correlation: L_intra is then 0. ``sample_weight`` (B,) weights each sample's inter term in place of 1/B's
    uniform weights (it still divides by B); the intra term correlates the whole batch and takes no weights.
    """
    p_s = (student_logits.float() / temperature).softmax(dim=-1)
    p_t = (teacher_logits.float() / temperature).softmax(dim=-1)
    inter_per_sample = 1 - _pearson(p_s, p_t, dim=-1)
    if sample_weight is not None:
        inter_per_sample = inter_per_sample * sample_weight.float()
    inter = inter_per_sample.mean() * temperature ** 2
    if p_s.shape[0] < 2:
        intra = p_s.sum() * 0  # zero, yet part of the graph like any term
    else:
        intra = (1 - _pearson(p_s, p_t, dim=0)).mean() * temperature ** 2
    return inter, intra


@register_distill_loss('dist')
class DISTLoss(DistillLoss):
    """DIST: ``beta * L_inter + gamma * L_intra`` on (B, K) logits, p = softmax(logits / tau):

        L_inter = tau^2 * 1/B * sum_b (1 - pearson(p^S_b, p^T_b))          (across classes, per sample)
        L_intra = tau^2 * 1/K * sum_k (1 - pearson(p^S_{:,k}, p^T_{:,k}))  (across the batch, per class)

    Matching correlations rather than the probabilities themselves lets the student keep its own scale and
    shift of the teacher's predictions, which the authors find matters most when the teacher is much stronger.
    A batch of one sample has no intra-class correlation: L_intra is 0 there.

    Reference: Huang, You, Wang, Qian & Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022;
    defaults are its ImageNet setting (beta = gamma = tau = 1; the paper's CIFAR-100 setting is 2, 2, 4).
    Terms: ``{'dist_inter', 'dist_intra'}``. Uses logits only (no stage taps).

    Args:
        student_channels: unused (logits only); accepted like every loss's.
        teacher_channels: unused (logits only); accepted like every loss's.
        beta: weight of the inter-class relation term (correlation across classes per sample).
        gamma: weight of the intra-class relation term (correlation across the batch per class).
        temperature: softmax temperature tau of both distributions; the terms are scaled by tau^2.
    """
    stage_policy = 'none'

    def __init__(
            self,
            student_channels: Sequence[int] = (),
            teacher_channels: Sequence[int] = (),
            beta: float = 1.0,
            gamma: float = 1.0,
            temperature: Annotated[float, Positive] = 1.0,
    ):
        super().__init__(student_channels, teacher_channels)
        self.beta = beta
        self.gamma = gamma
        self.temperature = temperature

    def forward(self, student_feats, teacher_feats, student_logits, teacher_logits,
                target: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        inter, intra = dist_relations(student_logits, teacher_logits, self.temperature)
        return {'dist_inter': self.beta * inter, 'dist_intra': self.gamma * intra}
