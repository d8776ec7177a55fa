"""LSKD: knowledge distillation on standardised logits (Sun et al., CVPR 2024)."""
from typing import Annotated, Dict, Optional, Sequence

import torch

from ._loss_options import NonNegative, Positive
from ._registry import register_distill_loss
from .base import DistillLoss
from .kd import kd_divergence

__all__ = ['LSKDLoss', 'lskd_divergence', 'standardize_logits']

# added to the standard deviation, as the authors' code and torchdistill's LogitStdKDLoss do: a sample whose
# logits are all equal has std 0
STD_EPS = 1e-7


def standardize_logits(logits: torch.Tensor, eps: float = STD_EPS) -> torch.Tensor:
    """Z-score of each sample's logits over the classes: (z - mean_k z) / (std_k z + eps); (B, K) -> (B, K) float32.

    std is the sample standard deviation (divides by K - 1), as ``torch.std`` in the authors' reference code; the
    paper's Algorithm 1 divides by K, which only rescales the base temperature by sqrt(K / (K - 1)).
    """
    z = logits.float()
    return (z - z.mean(dim=-1, keepdim=True)) / (z.std(dim=-1, keepdim=True) + eps)


def lskd_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                    sample_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """KD's divergence (`kd_divergence`) of the standardised logits (`standardize_logits`) at base temperature tau:
    tau^2 * KL(softmax(Z(t) / tau) || softmax(Z(s) / tau)), mean over the batch; logits (B, K), math in float32.

    ``sample_weight`` (B,) weights each sample's divergence, as in `kd_divergence`.
    """
    return kd_divergence(standardize_logits(student_logits), standardize_logits(teacher_logits), temperature,
                         sample_weight)


@register_distill_loss('lskd')
class LSKDLoss(DistillLoss):
    """LSKD: KD on z-scored logits, on (B, K) logits with a batch mean:

        Z(z)_b = (z_b - mean_k z_bk) / (std_k z_bk + 1e-7)                     (per sample, over the K classes)
        LSKD   = weight * tau^2 * 1/B * sum_b KL(softmax(Z(t)_b / tau) || softmax(Z(s)_b / tau))

    Each model's logits are standardised separately, so the student matches the teacher's logit relations (their
    ranking and relative gaps) rather than their range: the shared temperature of KD asks a small student to match
    a large teacher's logit scale, which it may not have the capacity to. Z(z) / tau is a softmax at a per-sample
    temperature tau * std_k(z); the loss is invariant to a per-sample shift and positive scale of either model's
    logits.

    Reference: Sun, Ren, Li, Wang & Cao, "Logit Standardization in Knowledge Distillation", CVPR 2024
    (arXiv 2403.01427); the authors' code (github.com/sunshangquan/logit-standardization-KD, ``--logit-stand
    --base-temp 2 --kd-weight 9``) and torchdistill's ``LogitStdKDLoss``. Defaults are the authors' CIFAR-100
    setting, also torchdistill's ImageNet resnet34 -> resnet18 one: base temperature 2 (3 for some CIFAR-100 pairs)
    and weight 9, with the cross-entropy at weight 1 (our ``task_loss_weight`` default; torchdistill's ImageNet
    config takes 0.5). The weight is large because standardised logits at tau 2 give soft distributions whose
    divergence is small.
    Terms: ``{'lskd'}``. Uses logits only (no stage taps).

    Args:
        student_channels: unused (logits only); accepted like every loss's.
        teacher_channels: unused (logits only); accepted like every loss's.
        temperature: base temperature tau of the standardised logits; the term is scaled by tau^2.
        weight: weight of the LSKD term.
    """
    stage_policy = 'none'

    def __init__(
            self,
            student_channels: Sequence[int] = (),
            teacher_channels: Sequence[int] = (),
            temperature: Annotated[float, Positive] = 2.0,
            weight: Annotated[float, NonNegative] = 9.0,
    ):
        super().__init__(student_channels, teacher_channels)
        self.temperature = temperature
        self.weight = weight

    def forward(self, student_feats, teacher_feats, student_logits, teacher_logits,
                target: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        return {'lskd': self.weight * lskd_divergence(student_logits, teacher_logits, self.temperature)}
