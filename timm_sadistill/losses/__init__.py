"""Distillation losses and their registry; importing this package registers the built-in losses."""
from .base import DistillLoss, label_indices, top1_hits
from ._loss_options import REQUIRED, Bound, HowNotWhat, LossOption, LossOptions, NonNegative, Positive
from ._registry import (
    check_loss_options, create_distill_loss, default_distill_loss, get_distill_loss_class, list_distill_losses,
    loss_options, register_distill_loss,
)
from ._plugins import load_loss_plugins
from ._loss_spec import parse_loss_spec
from .connectors import ConnectorName, align_spatial, create_connector, list_connectors
from .kd import KDLoss, kd_divergence
from .at import ATLoss
from .fitnet import FitNetLoss
from .cwd import CWDLoss
from .dkd import DKDLoss
from .dist import DISTLoss, dist_relations
from .lskd import LSKDLoss, lskd_divergence, standardize_logits
from .sa import SADistillLoss

__all__ = [
    'DistillLoss', 'KDLoss', 'ATLoss', 'FitNetLoss', 'CWDLoss', 'DKDLoss', 'DISTLoss', 'LSKDLoss', 'SADistillLoss',
    'register_distill_loss', 'create_distill_loss', 'list_distill_losses', 'get_distill_loss_class',
    'default_distill_loss',
    'loss_options', 'LossOptions', 'LossOption', 'Bound', 'Positive', 'NonNegative', 'HowNotWhat', 'REQUIRED',
    'check_loss_options', 'load_loss_plugins', 'parse_loss_spec',
    'kd_divergence', 'lskd_divergence', 'standardize_logits', 'dist_relations', 'label_indices', 'top1_hits',
    'align_spatial', 'create_connector', 'list_connectors', 'ConnectorName',
]
