"""`SADistillTask`: the SA method as a timm training task, with SA's options spelled out."""
from typing import Any, Dict, Optional, Sequence, Union

import torch
import torch.nn as nn
from timm.task import DistillationTeacher

from .._features import StagesArg
from .distill import DistillTask

__all__ = ['SADistillTask']


class SADistillTask(DistillTask):
    """Spatial-attention-map distillation (`SADistillLoss`, registered as ``'sa'``) as a `timm.task.TrainingTask`.

    ``loss = task_loss_weight * CE + distill_loss_weight * (sa_dist + sa_att + sa_kd)``; see `SADistillLoss` for the
    formulas and shapes. SA options left at None take `SADistillLoss`'s defaults, the ones the benchmark ablation
    measured. ``temperature`` is the logit KD temperature of SA's ``kd_weight`` term.

    Example:
        >>> task = SADistillTask(student, 'resnet50', teacher_pretrained_path='t.safetensors', img_size=224)
        >>> out = task(images, labels); out['loss'].backward()
    """

    def __init__(
            self,
            student_model: nn.Module,
            teacher_model: Union[str, nn.Module, DistillationTeacher],
            criterion: Optional[nn.Module] = None,
            criterion_kwargs: Optional[Dict[str, Any]] = None,
            teacher_pretrained_path: Optional[str] = None,
            teacher_pretrained: bool = False,
            teacher_pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
            distill_loss_weight: Optional[float] = None,
            task_loss_weight: Optional[float] = None,
            temperature: Optional[float] = None,
            student_stages: StagesArg = 'auto',
            teacher_stages: StagesArg = 'auto',
            img_size: Optional[Union[int, Sequence[int]]] = None,
            tau: Optional[float] = None,
            p: Optional[float] = None,
            alpha: Optional[float] = None,
            beta: Optional[float] = None,
            kd_weight: Optional[float] = None,
            connector: Optional[str] = None,
            backend: Optional[str] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
    ):
        sa_options = dict(tau=tau, p=p, alpha=alpha, beta=beta, kd_weight=kd_weight, connector=connector, backend=backend)
        super().__init__(
            student_model, teacher_model, loss='sa', criterion=criterion, criterion_kwargs=criterion_kwargs,
            teacher_pretrained_path=teacher_pretrained_path, teacher_pretrained=teacher_pretrained,
            teacher_pretrained_cfg_overlay=teacher_pretrained_cfg_overlay,
            distill_loss_weight=distill_loss_weight, task_loss_weight=task_loss_weight, temperature=temperature,
            student_stages=student_stages, teacher_stages=teacher_stages, img_size=img_size,
            device=device, dtype=dtype, verbose=verbose,
            **{k: v for k, v in sa_options.items() if v is not None},
        )
