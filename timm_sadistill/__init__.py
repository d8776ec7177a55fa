"""timm-sadistill: spatial-attention-map distillation (SA) and classic baselines for timm models."""
from . import ops
from .errors import MissingExtraError, UsageError
from .losses import (  # registers the losses
    ATLoss, CWDLoss, DistillLoss, DKDLoss, FitNetLoss, KDLoss, SADistillLoss,
    HowNotWhat, NonNegative, Positive, create_distill_loss, get_distill_loss_class, list_distill_losses, loss_options,
    parse_loss_spec, register_distill_loss,
)
from .features import FeatureTaps, StageInfo, list_stages, pair_stages
from .tasks import DistillTask, NonFiniteLossError, SADistillTask, create_distill_task, guard_finite_loss

__version__ = '0.1.0'

__all__ = [
    'ops', 'UsageError', 'MissingExtraError',
    'DistillLoss', 'SADistillLoss', 'KDLoss', 'ATLoss', 'FitNetLoss', 'CWDLoss', 'DKDLoss',
    'register_distill_loss', 'create_distill_loss', 'list_distill_losses', 'get_distill_loss_class', 'loss_options',
    'Positive', 'NonNegative', 'HowNotWhat', 'parse_loss_spec',
    'FeatureTaps', 'StageInfo', 'list_stages', 'pair_stages',
    'DistillTask', 'SADistillTask', 'create_distill_task', 'NonFiniteLossError', 'guard_finite_loss',
]
