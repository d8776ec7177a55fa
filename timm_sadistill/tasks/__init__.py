from .distill import DistillTask, DistillTrainableModule, resolve_loss_weights, resolve_teacher
from .sa import SADistillTask
from .factory import create_distill_task
from .nonfinite import NonFiniteLossError, describe_nonfinite, diagnose_nonfinite, guard_finite_loss

__all__ = ['DistillTask', 'DistillTrainableModule', 'SADistillTask', 'create_distill_task', 'resolve_loss_weights', 'resolve_teacher',
           'NonFiniteLossError', 'describe_nonfinite', 'diagnose_nonfinite', 'guard_finite_loss']
