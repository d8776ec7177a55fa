"""Our distillation task in place of timm's own: the task classes timm's train.py builds when ``--kd-model-name`` is
set (``LogitDistillationTask``, ``FeatureDistillationTask``, ``TokenDistillationTask``) replaced, for the duration of a
``with patched_timm_tasks(timm_task_factory(method, options, img_size)):``, by a factory that returns
``create_distill_task(method, ...)`` with train.py's own arguments (weights, temperature, device)."""
import contextlib
import importlib
import logging
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import torch.nn as nn

from ..losses import loss_options
from .distill_task import DistillTask
from .factory import create_distill_task

__all__ = ['timm_task_factory', 'patched_timm_tasks', 'PATCHED_TASK_NAMES']

_logger = logging.getLogger('timm_sadistill.timm_train')

# The task classes timm's train.py constructs, and the modules it may import them from (not all in every version).
PATCHED_TASK_NAMES = ('LogitDistillationTask', 'FeatureDistillationTask', 'TokenDistillationTask')
PATCHED_MODULE_NAMES = ('timm.task', 'timm.task.distillation', 'timm.task.token_distillation')


def _task_modules() -> List[Any]:
    modules = []
    for name in PATCHED_MODULE_NAMES:
        with contextlib.suppress(ImportError):
            modules.append(importlib.import_module(name))
    return modules


def timm_task_factory(
        method: str,
        options: Dict[str, Any],
        img_size: Optional[Union[int, Tuple[int, int]]],
):
    """A stand-in for timm's distillation task classes that builds our task for ``method``."""

    def build_distill_task(
            student_model: nn.Module,
            teacher_model: Union[str, nn.Module],
            criterion: Optional[nn.Module] = None,
            distill_loss_weight: Optional[float] = None,
            task_loss_weight: Optional[float] = None,
            temperature: Optional[float] = None,
            device=None,
            dtype=None,
            verbose: bool = True,
            **timm_task_options,
    ) -> DistillTask:
        # timm's own task options (loss_type, feature dims, token distill type) describe its methods, not ours
        if timm_task_options and verbose:
            _logger.info(f"timm-train: --distill {method} replaces timm's task; unused: {', '.join(timm_task_options)}")
        kwargs = dict(options)
        # train.py always passes its default temperature: it applies only to the methods that have one
        if temperature is not None and 'temperature' in loss_options(method).defaults:
            kwargs['temperature'] = temperature
        return create_distill_task(
            method, student_model, teacher_model, criterion=criterion, img_size=img_size,
            distill_loss_weight=distill_loss_weight, task_loss_weight=task_loss_weight,
            device=device, dtype=dtype, verbose=verbose, **kwargs,
        )

    return build_distill_task


@contextlib.contextmanager
def patched_timm_tasks(factory) -> Iterator[None]:
    """Replace timm's distillation task classes with ``factory`` in every module train.py may import them from."""
    saved = [(module, name, getattr(module, name)) for module in _task_modules() for name in PATCHED_TASK_NAMES
             if hasattr(module, name)]
    for module, name, _ in saved:
        setattr(module, name, factory)
    try:
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)
