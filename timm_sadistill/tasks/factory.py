"""`create_distill_task`: one call, one name, for every registered distillation method."""
from typing import Union

import torch.nn as nn
from timm.task import DistillationTeacher

from ..losses import get_distill_loss_class
from .distill_task import DistillTask

__all__ = ['create_distill_task']


def create_distill_task(
        name: str,
        student_model: nn.Module,
        teacher_model: Union[str, nn.Module, DistillationTeacher],
        **kwargs,
) -> DistillTask:
    """The distillation task for a registered loss name (``tsd.list_distill_losses()``), e.g.
    ``create_distill_task('sa', student, teacher)``: what every benchmark table calls "SA". One task class serves
    every loss: what a loss needs from the models it declares itself (see `DistillLoss`).

    ``kwargs`` are `DistillTask`'s (weights, stages, img_size, teacher checkpoint, ...) and the loss's own options.
    """
    get_distill_loss_class(name)  # an unknown name fails here, listing the registered ones
    return DistillTask(student_model, teacher_model, loss=name, **kwargs)
