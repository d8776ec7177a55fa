"""Non-finite losses: a check on the scalar loss each step, and a diagnosis that names the culprit after a failure.

The per-step check reads one scalar, so it costs nothing measurable; only when it fails does `diagnose_nonfinite`
run the forward again to find the first tensor (input, a teacher or student stage, logits, a loss term) that
holds NaN or inf. The diagnosis changes nothing: every buffer the re-run forward moves is put back.
"""
import logging
from contextlib import contextmanager
from typing import Dict, Iterator, List

import torch
import torch.nn as nn
from timm.utils.model import unwrap_model

from .distill_task import DistillTask

__all__ = ['NonFiniteLossError', 'diagnose_nonfinite', 'describe_nonfinite', 'guard_finite_loss']

_logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The training loss is NaN or inf; the message names the tensors that are."""


def _describe(name: str, x: torch.Tensor) -> str:
    x = x.detach()
    return f"{name} {tuple(x.shape)}: {int(torch.isnan(x).sum())} NaN, {int(torch.isinf(x).sum())} inf"


@contextmanager
def _buffers_restored(module: nn.Module) -> Iterator[None]:
    """Put every buffer of ``module`` back as it was on exit.

    A forward in train mode moves BatchNorm running statistics (and the SA warm-up's step count); a re-run for a
    diagnosis must not, or it shifts the model the run goes on training (``--skip-nonfinite``) or saves.
    """
    saved = {name: buffer.clone() for name, buffer in module.named_buffers()}
    try:
        yield
    finally:
        for name, value in saved.items():
            module.get_buffer(name).copy_(value)  # by name: a module may have rebound the attribute


@torch.no_grad()
def diagnose_nonfinite(task, input: torch.Tensor, target: torch.Tensor) -> List[str]:
    """Re-run ``task`` on the batch and list every non-finite tensor along the way, in forward order.

    Works for `DistillTask` (input, teacher stages and logits, student stages and logits, each loss term) and for
    any timm task (input, output and every term of its result). Parameters and buffers are left as they were.
    """
    with _buffers_restored(task):
        return _nonfinite_tensors(task, input, target)


def _nonfinite_tensors(task, input: torch.Tensor, target: torch.Tensor) -> List[str]:
    """The non-finite tensors of one forward of ``task`` on the batch, in forward order."""
    found = []
    if not torch.isfinite(input).all():
        found.append(_describe('input', input))
    if isinstance(task, DistillTask):
        teacher_logits, teacher_feats = task.teacher_taps(task.teacher_input(input))
        teacher_logits = task.restrict_teacher_logits(teacher_logits)  # those the loss reads
        for stage, feat in zip(task.teacher_stages, teacher_feats):
            if not torch.isfinite(feat).all():
                found.append(_describe(f"teacher stage '{stage.name}'", feat))
        if not torch.isfinite(teacher_logits).all():
            found.append(_describe('teacher logits', teacher_logits))
        _, feats = unwrap_model(task.get_trainable_module()).student_taps(input)
        for stage, feat in zip(task.student_stages, feats):
            if not torch.isfinite(feat).all():
                found.append(_describe(f"student stage '{stage.name}'", feat))
    result: Dict[str, torch.Tensor] = task(input, target)
    for key, value in result.items():
        if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
            found.append(_describe('student logits' if key == 'output' else f"loss term '{key}'", value))
    return found


def describe_nonfinite(task, input: torch.Tensor, target: torch.Tensor) -> str:
    """`diagnose_nonfinite` as one line for an error message."""
    culprits = diagnose_nonfinite(task, input, target)
    if not culprits:
        return 'no tensor of this batch is non-finite in this process (another rank, or the weighted sum overflowed)'
    return '; '.join(culprits)


def _finite_everywhere(loss: torch.Tensor, all_ranks: bool) -> bool:
    """Whether the scalar ``loss`` is finite here and, with ``all_ranks``, on every rank of the process group."""
    finite = torch.isfinite(loss.detach())
    if all_ranks:  # ranks must agree on skipping a step, or DDP waits forever for the rank that skipped
        finite = finite.to(torch.int32)
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return bool(finite)


def guard_finite_loss(
        task,
        result: Dict[str, torch.Tensor],
        input: torch.Tensor,
        target: torch.Tensor,
        skip: bool = False,
        where: str = '',
        all_ranks: bool = False,
) -> bool:
    """The non-finite policy of a training step: True when ``result['loss']`` is finite. Otherwise name the
    culprits (`describe_nonfinite`), then warn and return False (``skip``: the caller drops the step) or raise
    `NonFiniteLossError`.

    Args:
        where: the step, for the message (e.g. ``'epoch 3, batch 17'``).
        all_ranks: decide over every rank of the process group (one all-reduce of one integer), as a distributed
            loop must: a step is dropped on every rank or on none.
    """
    if _finite_everywhere(result['loss'], all_ranks):
        return True
    culprits = describe_nonfinite(task, input, target)
    if skip:
        _logger.warning(f"Skipping {'step at ' + where if where else 'this step'} (--skip-nonfinite): "
                        f"non-finite loss; {culprits}.")
        return False
    raise NonFiniteLossError(
        f"Non-finite loss{' at ' + where if where else ''}: {culprits}. Lower the learning rate, use bf16 instead "
        "of fp16, check the data, or pass --skip-nonfinite to skip such steps."
    )
