"""FitNets hints (Romero et al., ICLR 2015)."""
from typing import Annotated, Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from ._loss_options import NonNegative
from ._registry import register_distill_loss
from .base import DistillLoss
from .connectors import ConnectorList, ConnectorName

__all__ = ['FitNetLoss']


@register_distill_loss('fitnet')
class FitNetLoss(DistillLoss):
    """FitNet: ``weight * mean_k MSE(r_k(s_k), t_k)`` with a conv regressor r_k (3x3 conv + BN + ReLU).

    Shapes: r_k maps (B, Cs, Hs, Ws) to (B, Ct, Ht, Wt) (resized when the maps differ). Under ``auto`` the task
    gives it the middle stage pair, the hint layer of the paper; weight 100 as in the common reference code.

    Reference: Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015.
    Terms: ``{'fitnet'}``.

    Args:
        weight: weight of the hint term.
        connector: student->teacher regressor r_k.
    """
    stage_policy = 'middle'

    def __init__(
            self,
            student_channels: Sequence[int] = (),
            teacher_channels: Sequence[int] = (),
            weight: Annotated[float, NonNegative] = 100.0,
            connector: ConnectorName = 'regressor',
    ):
        super().__init__(student_channels, teacher_channels)
        self.weight = weight
        self.connectors = ConnectorList(connector, self.student_channels, self.teacher_channels)

    def forward(self, student_feats, teacher_feats, student_logits, teacher_logits,
                target: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        self.check_features(student_feats, teacher_feats)
        losses = [F.mse_loss(s.float(), t.float()) for s, t in self.connectors.pairs(student_feats, teacher_feats)]
        return {'fitnet': self.weight * torch.stack(losses).mean()}
