"""Distillation as timm training tasks: `DistillTask` for every registered loss, its teacher, `SADistillTask`, the
factory, and the non-finite-loss policy of a training step."""
from .teacher import check_teacher_weights, resolve_teacher
from .distill_task import DistillTask, DistillTrainableModule, resolve_loss_weights
from .sa_task import SADistillTask
from .factory import create_distill_task
from .nonfinite import NonFiniteLossError, describe_nonfinite, diagnose_nonfinite, guard_finite_loss

__all__ = [
    'DistillTask', 'DistillTrainableModule', 'SADistillTask', 'create_distill_task', 'check_teacher_weights',
    'resolve_loss_weights', 'resolve_teacher', 'NonFiniteLossError', 'describe_nonfinite', 'diagnose_nonfinite',
    'guard_finite_loss',
]
