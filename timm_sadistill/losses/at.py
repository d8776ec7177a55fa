"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017)."""
from typing import Annotated, Dict, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange

from .. import ops
from ._loss_options import NonNegative, Positive
from ._registry import register_distill_loss
from .base import DistillLoss
from .connectors import align_spatial

__all__ = ['ATLoss']


@register_distill_loss('at')
class ATLoss(DistillLoss):
    """AT: match L2-normalised spatial attention maps at(f) = normalize(mean_c |f|^p) of each stage pair.

    ``mode='code'`` (the authors' code, default): ``weight * sum_k mean_{b,i} (at(s_k) - at(t_k))^2``, weight 1000.
    ``mode='paper'``: ``weight / 2 * sum_k 1/(B*HW_k) * sum_b ||at(s_k)_b - at(t_k)_b||_2`` (the paper's
    non-squared p=2 norm, with beta = weight divided by the map size and the batch size).
    Maps are (B, H*W); when stage sizes differ the student map is resized to the teacher's before normalising
    (exact, since resizing is linear and the normalisation is scale free). For p = 2, |f|^p equals the code's
    f.pow(2). Needs no connector: maps do not depend on channel counts.

    Reference: Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017.
    Terms: ``{'at'}``.

    Args:
        p: power of |f| in the attention map.
        weight: weight of the AT term, as in the authors' code.
        mode: 'code' (squared distance of the maps, the authors' code) or 'paper' (the paper's p=2 norm).
    """

    def __init__(
            self,
            student_channels: Sequence[int] = (),
            teacher_channels: Sequence[int] = (),
            p: Annotated[float, Positive] = 2.0,
            weight: Annotated[float, NonNegative] = 1000.0,
            mode: Literal['code', 'paper'] = 'code',
    ):
        super().__init__(student_channels, teacher_channels)
        self.p = p
        self.weight = weight
        self.mode = mode

    def _student_map(self, s: torch.Tensor, size) -> torch.Tensor:
        if tuple(s.shape[-2:]) == tuple(size):
            return ops.spatial_attention(s, self.p)
        raw = s.float().abs().pow(self.p).mean(dim=1, keepdim=True)
        return F.normalize(rearrange(align_spatial(raw, size), 'b 1 h w -> b (h w)'), dim=1)

    def forward(self, student_feats, teacher_feats, student_logits, teacher_logits,
                target: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        self.check_features(student_feats, teacher_feats)
        losses = []
        for s, t in zip(student_feats, teacher_feats):
            diff = self._student_map(s, t.shape[-2:]) - ops.spatial_attention(t, self.p)  # (B, H*W) float32
            losses.append(diff.pow(2).mean() if self.mode == 'code' else diff.norm(dim=1).sum() / diff.numel() / 2)
        return {'at': self.weight * torch.stack(losses).sum()}
