"""`TeacherLeadGate`: distil only while the teacher labels the student's training images better than the student does.

A teacher from elsewhere can be wrong on a share of the student's own images, and then every term of a distillation
loss pulls the student towards a model no better than itself (docs/results.md#the-weak-teacher-search). What the
teacher knows beyond the labels is measured where the student learns, on its training batches: both models' top-1
against the labels, each a running mean over the last steps,

    r_X <- m * r_X + (1 - m) * mean_b [argmax_k X_bk == y_b]     (X: teacher, student; r_X starts at the first batch)

and the gate multiplies the whole distillation term by

    'while_ahead':      g = [r_teacher > r_student]                  (on again if the student falls back)
    'until_caught_up':  g = prod over the steps so far of [r_teacher > r_student]   (off for good once it is not)

A strong teacher stays ahead of the student on its own images all run long, and the gate never acts; a teacher at
or below the student is caught up with early, and the student then trains on its labels alone. The step's gate is
decided after the step's batch is counted, in training mode only; the running means and the gate are buffers, so a
checkpoint resumes the gate where it was, and under DDP (which broadcasts buffers before each forward) every rank
starts each step from rank 0's running means and counts its own batch in.
"""
from typing import Literal

import torch
import torch.nn as nn

from .base import top1_hits

__all__ = ['GATES', 'TeacherLeadGate']

GATES = ('none', 'while_ahead', 'until_caught_up')

# about the last ten steps: long enough to average a batch's noise out, short enough to follow an epoch's progress
MOMENTUM = 0.9


class TeacherLeadGate(nn.Module):
    """The gate g in {0, 1} of a distillation term (module docstring): ``gate(student_logits, teacher_logits,
    target)`` with logits (B, K) and target (B,) labels or (B, K) soft targets (their top class) -> g, a float32
    scalar tensor (no device sync: the decision stays on the device).

    Buffers: ``running`` (2,) the teacher's and the student's running top-1 (fractions), ``counted`` the training
    steps counted, ``open`` the current gate.
    """

    def __init__(self, mode: Literal['while_ahead', 'until_caught_up']):
        super().__init__()
        if mode not in GATES[1:]:
            raise ValueError(f"TeacherLeadGate mode {mode!r}: one of {', '.join(GATES[1:])}.")
        self.mode = mode
        self.register_buffer('running', torch.zeros(2))
        self.register_buffer('counted', torch.zeros((), dtype=torch.long))
        self.register_buffer('open', torch.ones(()))

    @torch.no_grad()
    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.training:
            batch = torch.stack([top1_hits(teacher_logits, target).mean(), top1_hits(student_logits, target).mean()])
            first = (self.counted == 0).float()
            self.running.copy_(first * batch + (1 - first) * (MOMENTUM * self.running + (1 - MOMENTUM) * batch))
            self.counted += 1
            ahead = (self.running[0] > self.running[1]).float()
            self.open.copy_(ahead if self.mode == 'while_ahead' else self.open * ahead)
        return self.open.clone()

    def extra_repr(self) -> str:
        return f'mode={self.mode!r}'
