"""Distillation losses; importing this package registers them."""
from .base import DistillLoss
from .connectors import align_spatial, create_connector, list_connectors
from .kd import KDLoss, kd_divergence
from .at import ATLoss
from .fitnet import FitNetLoss
from .cwd import CWDLoss
from .dkd import DKDLoss
from .sa import SADistillLoss

__all__ = [
    'DistillLoss', 'KDLoss', 'ATLoss', 'FitNetLoss', 'CWDLoss', 'DKDLoss', 'SADistillLoss',
    'kd_divergence', 'align_spatial', 'create_connector', 'list_connectors',
]
