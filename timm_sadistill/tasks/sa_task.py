"""`SADistillTask`: the SA method as a timm training task, taking SA's options as keywords."""
from typing import Any, Union

import torch.nn as nn
from timm.task import DistillationTeacher

from ..errors import UsageError
from .distill_task import DistillTask

__all__ = ['SADistillTask']


class SADistillTask(DistillTask):
    """Spatial-attention-map distillation (`SADistillLoss`, registered as ``'sa'``) as a `timm.task.TrainingTask`:
    ``DistillTask(..., loss='sa')``, kept as a named class for Python callers. ``create_distill_task('sa', ...)`` and
    the command line build a plain `DistillTask`, as for every loss.

    ``loss = task_loss_weight * CE + distill_loss_weight * (sa_dist + sa_att + sa_kd)``; see `SADistillLoss` for the
    formulas, the shapes and SA's options (its ``Args:``; ``tsd.loss_options('sa').options`` lists them), which this
    task takes as keywords (None keeps the default). Every other argument (criterion, teacher_pretrained_path,
    weights, student_stages, teacher_stages, img_size, device, ...) is `DistillTask`'s.

    Example:
        >>> task = SADistillTask(student, 'resnet50', teacher_pretrained_path='t.safetensors', img_size=224, beta=10)
        >>> out = task(images, labels); out['loss'].backward()
    """

    def __init__(
            self,
            student_model: nn.Module,
            teacher_model: Union[str, nn.Module, DistillationTeacher],
            **kwargs: Any,
    ):
        if 'loss' in kwargs:
            raise UsageError("SADistillTask always uses the 'sa' loss; use DistillTask(loss=...) for another one.")
        super().__init__(student_model, teacher_model, loss='sa', **kwargs)
