"""``timm-sadistill timm-train``: run your own, unmodified timm ``train.py`` with our distillation task.

    timm-sadistill timm-train path/to/timm/train.py <its flags> --kd-model-name resnet50 \\
        --teacher-checkpoint t.safetensors --distill sa [--sa-beta 10 ...]

timm's train.py builds ``LogitDistillationTask`` / ``FeatureDistillationTask`` / ``TokenDistillationTask`` (imported
from ``timm.task``) when ``--kd-model-name`` is set. This command removes our flags (``--distill``,
``--teacher-checkpoint``, ``--teacher-pretrained``, ``--distill-stages``, ``--teacher-stages``, the loss options'
``--<loss>-<option>``) from the
command line, replaces those task classes in ``timm.task`` with a factory that returns
``create_distill_task(<--distill>, student, <--kd-model-name>, teacher_pretrained_path=<--teacher-checkpoint>, ...)``,
and runs the script as ``__main__``. The flags train.py knows itself (``--kd-model-name``, ``--distill-loss-weight``,
``--task-loss-weight``, ``--kd-temperature``) reach it untouched and are honoured by our task; the teacher loads from
``--teacher-checkpoint``, never from the hub unless ``--teacher-pretrained`` is given.

Supported timm versions: those whose train.py drives a ``timm.task`` task, i.e. timm >= 1.0.23; tested with 1.0.31.
"""
import argparse
import contextlib
import importlib
import logging
import os
import runpy
import sys
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch.nn as nn

from ..losses import loss_options
from ..tasks import DistillTask, create_distill_task
from .distill_flags import add_distill_arguments, check_teacher_flags, distill_task_kwargs, join_stage_values
from ..errors import UsageError
from ._parser import OneLineArgumentParser, check_finite_floats

__all__ = ['main', 'patched_timm_tasks']

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


def _build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog='timm-sadistill timm-train', allow_abbrev=False,  # no prefix matching: train.py's flags must pass through
        usage='timm-sadistill timm-train TRAIN_PY <train.py flags> --kd-model-name NAME --teacher-checkpoint FILE '
              '--distill METHOD [--<method>-<option> ...]',
    )
    add_distill_arguments(parser, include_timm_kd_flags=False)
    return parser


def _peek_train_py_args(argv: Sequence[str]) -> argparse.Namespace:
    """Read (without removing) the train.py flags our task needs to know: the teacher and the input size."""
    peek = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    peek.add_argument('--kd-model-name', default=None)
    peek.add_argument('--img-size', type=int, default=None)
    peek.add_argument('--input-size', type=int, nargs=3, default=None)
    return peek.parse_known_args(list(argv))[0]


def _check_script(path: str) -> None:
    """Refuse a script that is not timm's train.py: we can only patch the task construction it has."""
    if not os.path.isfile(path):
        raise UsageError(f"train.py '{path}' does not exist; pass the path of timm's train.py as the first argument.")
    with open(path, encoding='utf-8', errors='replace') as f:
        source = f.read()
    if 'kd_model_name' not in source or not any(name in source for name in PATCHED_TASK_NAMES):
        raise UsageError(
            f"'{path}' does not look like timm's train.py (no --kd-model-name and no {' / '.join(PATCHED_TASK_NAMES)} "
            "construction to replace); use the train.py of timm >= 1.0.23, or `timm-sadistill train`."
        )


def _make_task_factory(
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


@contextlib.contextmanager
def _script_invocation(path: str, argv: List[str]) -> Iterator[None]:
    """sys.argv and sys.path as ``python path argv...`` would set them."""
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [path] + argv
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    try:
        yield
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path


def main(argv: Optional[List[str]] = None) -> int:
    """``timm-sadistill timm-train TRAIN_PY ...``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser()
    if not argv or argv[0] in ('-h', '--help'):
        parser.print_help()
        return 0 if argv else 2
    script, rest = argv[0], argv[1:]
    _check_script(script)
    ours, train_py_argv = parser.parse_known_args(join_stage_values(rest))
    check_finite_floats(parser, ours)
    if ours.distill == 'none':
        raise UsageError("timm-train needs --distill METHOD (e.g. sa); without it, run train.py directly.")
    peeked = _peek_train_py_args(train_py_argv)
    if not peeked.kd_model_name:
        raise UsageError("timm-train needs --kd-model-name TEACHER: train.py builds a distillation task only with it.")
    check_teacher_flags(peeked.kd_model_name, ours, flag='--kd-model-name')
    img_size = tuple(peeked.input_size[1:]) if peeked.input_size else peeked.img_size
    factory = _make_task_factory(ours.distill, distill_task_kwargs(ours), img_size)
    with patched_timm_tasks(factory), _script_invocation(script, train_py_argv):
        runpy.run_path(script, run_name='__main__')
    return 0
