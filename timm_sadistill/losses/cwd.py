"""Channel-wise distillation (Shu et al., ICCV 2021)."""
from typing import Annotated, Dict, Optional, Sequence

import torch

from .. import ops
from ._loss_options import NonNegative, Positive
from ._registry import register_distill_loss
from .base import DistillLoss
from .connectors import ConnectorList, ConnectorName

__all__ = ['CWDLoss']


@register_distill_loss('cwd')
class CWDLoss(DistillLoss):
    """CWD: ``weight * mean_k tau^2/(B*C) * sum_{b,c} KL(softmax_i(t_bc/tau) || softmax_i(s'_bc/tau))``.

    Each channel's activations become a distribution over the H*W positions; s' is the student map after a
    1x1 conv + BN connector to the teacher's channels and size. Under ``auto`` it distils the last stage pair,
    as the paper applies it to the final feature map. Uses the fused ``ops.spatial_kl``.

    Reference: Shu et al., "Channel-wise Knowledge Distillation for Dense Prediction", ICCV 2021.
    Terms: ``{'cwd'}``.

    Args:
        tau: softmax temperature over the positions.
        weight: weight of the CWD term.
        connector: student->teacher connector.
    """
    stage_policy = 'last'

    def __init__(
            self,
            student_channels: Sequence[int] = (),
            teacher_channels: Sequence[int] = (),
            tau: Annotated[float, Positive] = 4.0,
            weight: Annotated[float, NonNegative] = 3.0,
            connector: ConnectorName = 'conv1x1',
    ):
        super().__init__(student_channels, teacher_channels)
        self.tau = tau
        self.weight = weight
        self.connectors = ConnectorList(connector, self.student_channels, self.teacher_channels)

    def forward(self, student_feats, teacher_feats, student_logits, teacher_logits,
                target: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        self.check_features(student_feats, teacher_feats)
        losses = [ops.spatial_kl(s, t, self.tau) for s, t in self.connectors.pairs(student_feats, teacher_feats)]
        return {'cwd': self.weight * torch.stack(losses).mean()}
