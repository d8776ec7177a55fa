"""Distillation losses and their registry; importing this package registers the built-in losses."""
from ._registry import (
    REQUIRED, LossOptions, create_distill_loss, get_distill_loss_class, list_distill_losses, loss_options,
    register_distill_loss,
)
from .base import DistillLoss
from .connectors import align_spatial, create_connector, list_connectors
from .kd import KDLoss, kd_divergence
from .at import ATLoss
from .fitnet import FitNetLoss
from .cwd import CWDLoss
from .dkd import DKDLoss
from .dist import DISTLoss, dist_relations
from .sa import SADistillLoss

__all__ = [
    'DistillLoss', 'KDLoss', 'ATLoss', 'FitNetLoss', 'CWDLoss', 'DKDLoss', 'DISTLoss', 'SADistillLoss',
    'register_distill_loss', 'create_distill_loss', 'list_distill_losses', 'get_distill_loss_class',
    'loss_options', 'LossOptions', 'REQUIRED',
    'kd_divergence', 'dist_relations', 'align_spatial', 'create_connector', 'list_connectors',
]
