"""SA: spatial-attention-map distillation (Wang & Liu 2024, reconstructed from the abstract; DESIGN section 1)."""
from typing import Dict, Optional, Sequence

import torch

from .. import ops
from ._registry import register_distill_loss
from .base import DistillLoss
from .connectors import ConnectorList
from .kd import kd_divergence

__all__ = ['SADistillLoss']


@register_distill_loss('sa')
class SADistillLoss(DistillLoss):
    """SA: per stage pair k, with S'_k = g_k(S_k) the student map through a conv connector, resized to (Ht, Wt):

        L_dist,k = tau^2 / (B*Ct) * sum_{b,c} KL(softmax_i(T_bc / tau) || softmax_i(S'_bc / tau))
        L_att,k  = 1/B * sum_b || a(S')_b - a(T)_b ||_2^2,   a(X)_b = normalize_i(mean_c |X_{b,c,i}|^p)
        SA       = mean_k (alpha * L_dist,k + beta * L_att,k)  (+ kd_weight * KD(logits, temperature))

    Shapes: student features (B, Cs_k, Hs_k, Ws_k), teacher features (B, Ct_k, Ht_k, Wt_k), logits (B, K).
    Both terms of a stage come from one fused pass (``ops.sa_loss_terms``: Triton on CUDA, PyTorch otherwise).

    Args:
        student_channels, teacher_channels: channels of each stage pair (the connectors are built from them).
        tau: spatial softmax temperature of L_dist.
        p: power of |x| in the attention map.
        alpha, beta: weights of L_dist and L_att.
        kd_weight: weight of the logit KD term (0 turns it off).
        temperature: logit KD temperature.
        connector: 'bottleneck' (default), 'conv1x1', 'regressor' or 'identity'.
        backend: 'auto', 'triton' or 'torch' for the fused ops.

    The defaults follow the first measurements in DESIGN section 1 (alpha 1, beta 10, tau 4, KD T 4 weight 1);
    benchmarks/ carries the ablation that revisits them.

    Reference: Wang & Liu, "Knowledge distillation algorithm based on spatial attention map", Application Research
    of Computers 41(6), 2024; built from CWD (Shu 2021), AT (Zagoruyko 2017) and a SimKD-style connector.
    Terms: ``{'sa_dist', 'sa_att'}`` and ``'sa_kd'`` when kd_weight > 0.
    """

    def __init__(
            self,
            student_channels: Sequence[int] = (),
            teacher_channels: Sequence[int] = (),
            tau: float = 4.0,
            p: float = 2.0,
            alpha: float = 1.0,
            beta: float = 10.0,
            kd_weight: float = 1.0,
            temperature: float = 4.0,
            connector: str = 'bottleneck',
            backend: str = 'auto',
    ):
        super().__init__(student_channels, teacher_channels)
        if tau <= 0 or temperature <= 0:
            raise ValueError(f"tau and temperature must be positive, got tau={tau}, temperature={temperature}.")
        if p <= 0:
            raise ValueError(f"p must be positive, got {p}.")
        if backend not in ops.BACKENDS:
            raise ValueError(f"Unknown backend '{backend}'; use one of {', '.join(ops.BACKENDS)}.")
        self.tau = tau
        self.p = p
        self.alpha = alpha
        self.beta = beta
        self.kd_weight = kd_weight
        self.temperature = temperature
        self.backend = backend
        self.connectors = ConnectorList(connector, self.student_channels, self.teacher_channels)

    def stage_terms(self, student_feats, teacher_feats) -> torch.Tensor:
        """Unweighted (L_dist, L_att) of every stage pair: a (K, 2) float32 tensor."""
        self.check_features(student_feats, teacher_feats)
        return self.projected_terms(self.connectors.pairs(student_feats, teacher_feats))

    def projected_terms(self, pairs) -> torch.Tensor:
        """(K, 2) float32 (L_dist, L_att) of (projected student, teacher) pairs, each (B, Ct_k, Ht_k, Wt_k)."""
        return torch.stack([
            torch.stack(ops.sa_loss_terms(s, t, self.tau, self.p, backend=self.backend)) for s, t in pairs
        ]).float()

    def forward(self, student_feats, teacher_feats, student_logits, teacher_logits,
                target: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        dist, att = self.stage_terms(student_feats, teacher_feats).mean(dim=0)
        terms = {'sa_dist': self.alpha * dist, 'sa_att': self.beta * att}
        if self.kd_weight:
            terms['sa_kd'] = self.kd_weight * kd_divergence(student_logits, teacher_logits, self.temperature)
        return terms
