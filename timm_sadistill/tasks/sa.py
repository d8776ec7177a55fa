"""`SADistillTask`: the SA method as a timm training task, with SA's options spelled out."""
from typing import Optional, Union

import torch.nn as nn
from timm.task import DistillationTeacher

from .distill import DistillTask

__all__ = ['SADistillTask']


class SADistillTask(DistillTask):
    """Spatial-attention-map distillation (`SADistillLoss`, registered as ``'sa'``) as a `timm.task.TrainingTask`.

    ``loss = task_loss_weight * CE + distill_loss_weight * (sa_dist + sa_att + sa_kd)``; see `SADistillLoss` for the
    formulas and shapes. SA options left at None take `SADistillLoss`'s defaults, the ones the benchmark ablation
    measured. Every other argument (criterion, teacher_pretrained_path, weights, ``temperature`` of the logit KD
    term, student_stages, teacher_stages, img_size, device, ...) is `DistillTask`'s.

    Example:
        >>> task = SADistillTask(student, 'resnet50', teacher_pretrained_path='t.safetensors', img_size=224)
        >>> out = task(images, labels); out['loss'].backward()
    """

    def __init__(
            self,
            student_model: nn.Module,
            teacher_model: Union[str, nn.Module, DistillationTeacher],
            tau: Optional[float] = None,
            p: Optional[float] = None,
            alpha: Optional[float] = None,
            beta: Optional[float] = None,
            kd_weight: Optional[float] = None,
            connector: Optional[str] = None,
            backend: Optional[str] = None,
            **task_kwargs,
    ):
        sa_options = dict(tau=tau, p=p, alpha=alpha, beta=beta, kd_weight=kd_weight, connector=connector, backend=backend)
        if 'loss' in task_kwargs:
            raise TypeError("SADistillTask always uses the 'sa' loss; use DistillTask(loss=...) for another one.")
        super().__init__(student_model, teacher_model, loss='sa', **task_kwargs,
                         **{k: v for k, v in sa_options.items() if v is not None})
