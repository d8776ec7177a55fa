"""The checks of ``--resume``, each mistake one line: the checkpoint is there and a training checkpoint
(`read_resume_checkpoint`, which reads it once and returns the flags of the run that wrote it), its model, method and
teacher are this command's (`check_resume_matches`, before anything is built) and so are its loss options and stages
(`check_resume_distill`, once the task is built and has resolved them)."""
import argparse
import os
from typing import Any, Optional

from .._checkpoint_checks import check_checkpoint_readable
from ..errors import UsageError
from ..losses import loss_options
from .run_folder import CHECKPOINT_FILES, LOCK_FILE, present_files

__all__ = ['read_resume_checkpoint', 'check_resume_matches', 'check_resume_distill']

# flags that decide what a checkpoint holds: resuming under others cannot load it (the loss's options and the
# stages are `check_resume_distill`'s)
_RESUME_FLAGS = ('model', 'distill', 'teacher')
# the stage flags, and what a run records of them: the stage names they resolved to ('auto' included)
_STAGE_FLAGS = (('distill_stages', 'distill_stages_resolved'), ('teacher_stages', 'teacher_stages_resolved'))


def _check_exists(resume: str, output: Optional[str]) -> None:
    """Refuse a ``--resume`` checkpoint that a run never wrote, saying how to restart a run that stopped before its
    first checkpoint (its folder is there, its ``last.pth.tar`` is not); its ``--experiment`` is its path under
    ``output`` (``ablation/run1``), else the folder's name."""
    folder = os.path.dirname(os.path.abspath(resume))
    if os.path.exists(resume) or not present_files(folder, ('args.yaml', LOCK_FILE)) or \
            present_files(folder, CHECKPOINT_FILES):
        return  # there, or not a run folder, or a run with other checkpoints: the readability check tells
    under = os.path.join(os.path.abspath(output), '') if output else None
    experiment = folder[len(under):] if under and folder.startswith(under) else os.path.basename(folder)
    raise UsageError(f"--resume '{resume}' does not exist: the run in '{folder}' stopped before its first checkpoint; "
                     f"drop --resume (and pass --experiment {experiment}) to start it over there.")


def read_resume_checkpoint(path: str, output: Optional[str] = None) -> Optional[argparse.Namespace]:
    """The flags of the run that wrote the ``--resume`` checkpoint ``path`` (its 'args'; None when it has none),
    after refusing a file that is missing, unreadable or not a training checkpoint (last.pth.tar,
    checkpoint-N.pth.tar): model weights alone (a model folder's model.safetensors) have no epoch, optimizer or
    connector state to continue from. The file is loaded once, here. ``output`` (``--output``) names the run's
    ``--experiment`` in the hint for a run that stopped before its first checkpoint."""
    _check_exists(path, output)
    checkpoint = check_checkpoint_readable(path, '--resume checkpoint')
    if not (isinstance(checkpoint, dict) and 'state_dict' in checkpoint and 'epoch' in checkpoint):
        raise UsageError(f"--resume '{path}' holds model weights, not a training checkpoint (no epoch or optimizer "
                         "state); continue a run with its last.pth.tar, or start from these weights with "
                         f"--initial-checkpoint {path}.")
    saved_args = checkpoint.get('args')
    return saved_args if isinstance(saved_args, argparse.Namespace) else None


def check_resume_matches(path: str, saved_args: Optional[argparse.Namespace], args: argparse.Namespace) -> None:
    """Refuse ``--resume`` of a run whose model, method or teacher differ from this command's: its checkpoint cannot
    load into what this command builds. ``saved_args`` are the run's flags (`read_resume_checkpoint`)."""
    if saved_args is None:  # a checkpoint without the run's flags (not written by train): loading will tell
        return
    for name in _RESUME_FLAGS:
        if not hasattr(saved_args, name):
            continue
        then, now = getattr(saved_args, name), getattr(args, name, None)
        if then != now:
            flag = '--' + name.replace('_', '-')
            raise UsageError(f"--resume '{path}' is a run with {flag} {then}, this command has {flag} {now}; resume "
                             f"with the run's flags, or start a new --experiment without --resume.")


def _spelled(value: Any) -> str:
    return ','.join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def check_resume_distill(path: str, saved_args: Optional[argparse.Namespace], args: argparse.Namespace) -> None:
    """Refuse ``--resume`` of a run distilled with other loss options, other stages or other teacher classes
    (`check_classes`) than this command's task (``args`` with the records of ``training.run.RECORDED_ARGS``):
    resuming would change the loss half-way. Values
    are compared, not spellings: a default given explicitly, or stages named as ``auto`` picked them, pass. An option
    the run's records lack (added to the loss since) is compared as its default.

    Raises:
        UsageError: another loss option carries it (``option``, ``loss``: the command line words it with its
            flag); other stages name their flag.
    """
    if saved_args is None or getattr(args, 'distill', 'none') == 'none':
        return
    then_options = getattr(saved_args, 'distill_options', None) or {}
    declared = loss_options(args.distill).options
    for name, now in getattr(args, 'distill_options', {}).items():
        if name in declared and not declared[name].changes_loss:  # a backend: the same loss, computed elsewhere
            continue
        # an option the run did not record came after it, and ran as its default (new options default to the old
        # behaviour): resuming with another value would change the loss half-way, and its state is not saved
        then = then_options.get(name, declared[name].default if then_options and name in declared else now)
        if then != now:
            raise UsageError(f"--resume '{path}' is a run with {{option:{then}}}, this command has {{option:{now}}}; "
                             f"resume with {{option:{then}}}, or start a new --experiment without --resume.",
                             option=name, loss=args.distill)
    for name, resolved in _STAGE_FLAGS:
        if hasattr(saved_args, resolved):
            then, now = getattr(saved_args, resolved), getattr(args, resolved)
        elif hasattr(saved_args, name):  # a run from before the resolved stages were recorded
            then, now = getattr(saved_args, name), getattr(args, name)
        else:
            continue
        if then != now:
            flag = '--' + name.replace('_', '-')
            raise UsageError(f"--resume '{path}' is a run with {flag} {_spelled(then)}, this command has {flag} "
                             f"{_spelled(now)}; resume with the run's {flag}, or start a new --experiment without "
                             "--resume.")
    # the teacher's classes the run distilled on follow from its data and teacher, which may have changed since
    then, now = getattr(saved_args, 'teacher_classes', None), getattr(args, 'teacher_classes', None)
    if hasattr(saved_args, 'teacher_classes') and then != now:
        then, now = (_spelled(v) if v else "all (the data's)" for v in (then, now))
        raise UsageError(f"--resume '{path}' is a run that distilled the teacher's classes {then} (args.yaml "
                         f"teacher_classes), this command its classes {now}; resume with the run's data "
                         "(--data-dir, --class-map) and --teacher, or start a new --experiment without --resume.")
