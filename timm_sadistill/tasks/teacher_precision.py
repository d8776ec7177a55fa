"""The frozen teacher in reduced precision: which autocast dtypes `DistillTask` takes for its teacher alone
(``teacher_amp_dtype``), and the one check of that option against the task's device and dtype."""
import warnings
from typing import Optional, Union

import torch

from ..errors import UsageError

__all__ = ['TEACHER_AMP_DTYPES', 'resolve_teacher_amp_dtype']

# name -> dtype of the autocast dtypes the teacher may run in; the names are timm's --amp-dtype choices
TEACHER_AMP_DTYPES = {'bfloat16': torch.bfloat16, 'float16': torch.float16}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace('torch.', '')


def resolve_teacher_amp_dtype(
        value: Union[None, str, torch.dtype],
        device: torch.device,
        dtype: torch.dtype,
) -> Optional[torch.dtype]:
    """The autocast dtype the teacher of a task on ``device`` in ``dtype`` runs in: None keeps the caller's precision
    (the teacher runs as the student does), ``'bfloat16'``/``torch.bfloat16`` or ``'float16'``/``torch.float16``
    run it under that autocast.

    Raises:
        UsageError: another value; a task that is not float32 (autocast leaves float64 alone, and a bf16/fp16 task's
            teacher is reduced already); a dtype autocast on ``device`` refuses or would turn off (torch's reason
            quoted), each naming ``teacher_amp_dtype``.
    """
    if value is None:
        return None
    amp_dtype = TEACHER_AMP_DTYPES.get(value) if isinstance(value, str) else value
    names = ' or '.join(TEACHER_AMP_DTYPES)
    if amp_dtype not in TEACHER_AMP_DTYPES.values():
        raise UsageError(f"{{option}} is {value!r}; pass {names} (a name or a torch.dtype), or None to run the "
                         "teacher in the task's precision.", option='teacher_amp_dtype')
    name = _dtype_name(amp_dtype)
    if dtype != torch.float32:
        raise UsageError(f"{{option:{name}}} runs a float32 teacher under autocast, but the task is built in "
                         f"{_dtype_name(dtype)}; build it in float32 (dtype=torch.float32) or leave {{option}} unset.",
                         option='teacher_amp_dtype')
    reason = _autocast_refusal(device, amp_dtype)
    if reason:
        others = [other for other, candidate in TEACHER_AMP_DTYPES.items()
                  if candidate != amp_dtype and not _autocast_refusal(device, candidate)]
        instead = f"use {{option:{others[0]}}}, or " if others else ''
        raise UsageError(f"{{option:{name}}}: autocast on {device.type} cannot run in {name} ({reason}); {instead}"
                         "leave {option} unset.", option='teacher_amp_dtype')
    return amp_dtype


def _autocast_refusal(device: torch.device, amp_dtype: torch.dtype) -> str:
    """Why autocast on ``device`` cannot run in ``amp_dtype``, torch's first line ('' when it can): torch refuses
    some pairs (bfloat16 on a GPU without it) and turns autocast off with a warning for others."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        try:
            torch.autocast(device.type, dtype=amp_dtype)
        except RuntimeError as e:
            return str(e).splitlines()[0].rstrip('.')
    return str(caught[0].message).splitlines()[0].rstrip('.') if caught else ''
