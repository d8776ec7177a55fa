"""`SADistillTask`: the SA method as a timm training task, taking SA's options as keywords."""
from typing import Any, Union

import torch.nn as nn
from timm.task import DistillationTeacher

from ..errors import UsageError
from ..losses.sa import SA_OPTIONS, document_sa_options
from .distill_task import DistillTask

__all__ = ['SADistillTask']

_SA_OPTION_NAMES = frozenset(option.name for option in SA_OPTIONS)


@document_sa_options
class SADistillTask(DistillTask):
    """Spatial-attention-map distillation (`SADistillLoss`, registered as ``'sa'``) as a `timm.task.TrainingTask`.

    ``loss = task_loss_weight * CE + distill_loss_weight * (sa_dist + sa_att + sa_kd)``; see `SADistillLoss` for the
    formulas and shapes. Every other argument (criterion, teacher_pretrained_path, weights, student_stages,
    teacher_stages, img_size, device, ...) is `DistillTask`'s.

    SA options (keywords, declared in `SA_OPTIONS`; None keeps the default), name (default): meaning:
{sa_options}

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
        # None stands for "not given" (as unset --sa-* flags arrive), so the loss keeps its default
        kwargs = {k: v for k, v in kwargs.items() if not (k in _SA_OPTION_NAMES and v is None)}
        super().__init__(student_model, teacher_model, loss='sa', **kwargs)
