"""``timm-sadistill timm-train``: run your own, unmodified timm ``train.py`` with our distillation task.

    timm-sadistill timm-train path/to/timm/train.py <its flags> --kd-model-name resnet50 \\
        --teacher-checkpoint t.safetensors --distill sa [--sa-beta 10 ...]

timm's train.py builds ``LogitDistillationTask`` / ``FeatureDistillationTask`` / ``TokenDistillationTask`` (imported
from ``timm.task``) when ``--kd-model-name`` is set. This command removes our flags (``--distill``,
``--teacher-checkpoint``, ``--teacher-pretrained``, ``--teacher-amp-dtype``, ``--teacher-compile``,
``--distill-stages``, ``--teacher-stages``, the loss options' ``--<loss>-<option>``) from the command line,
replaces those task classes in ``timm.task`` with a factory that returns
``create_distill_task(<--distill>, student, <--kd-model-name>, teacher_pretrained_path=<--teacher-checkpoint>, ...)``,
and runs the script as ``__main__``. The flags train.py knows itself (``--kd-model-name``, ``--distill-loss-weight``,
``--task-loss-weight``, ``--kd-temperature``) reach it untouched and are honoured by our task; the teacher loads from
``--teacher-checkpoint``, never from the hub unless ``--teacher-pretrained`` is given.

Supported timm versions: those whose train.py drives a ``timm.task`` task, i.e. timm >= 1.0.23; tested with 1.0.31.
"""
import argparse
import contextlib
import logging
import os
import runpy
import sys
from typing import Iterator, List, Optional, Sequence

from ..tasks.timm_task_patch import PATCHED_TASK_NAMES, patched_timm_tasks, timm_task_factory
from .distill_flags import add_distill_arguments, check_teacher_flags, distill_task_kwargs, join_stage_values
from ..errors import UsageError
from ._parser import OneLineArgumentParser, check_finite_floats

__all__ = ['main']

_logger = logging.getLogger('timm_sadistill.timm_train')

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
    if os.path.isdir(path):
        inside = os.path.join(path, 'train.py')
        raise UsageError(f"train.py '{path}' is a folder, not a script; pass the path of timm's train.py as the first "
                         f"argument{f', e.g. {inside}' if os.path.isfile(inside) else ''}.")
    if not os.path.isfile(path):
        raise UsageError(f"train.py '{path}' does not exist; pass the path of timm's train.py as the first argument.")
    with open(path, encoding='utf-8', errors='replace') as f:
        source = f.read()
    if 'kd_model_name' not in source or not any(name in source for name in PATCHED_TASK_NAMES):
        raise UsageError(
            f"'{path}' does not look like timm's train.py (no --kd-model-name and no {' / '.join(PATCHED_TASK_NAMES)} "
            "construction to replace); use the train.py of timm >= 1.0.23, or `timm-sadistill train`."
        )


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
    factory = timm_task_factory(ours.distill, distill_task_kwargs(ours), img_size)
    with patched_timm_tasks(factory), _script_invocation(script, train_py_argv):
        runpy.run_path(script, run_name='__main__')
    return 0
