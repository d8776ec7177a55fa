"""The run folder ``<output>/<experiment>/`` of ``train``: a finished run is never overwritten, a resumed run's files
continue where its last checkpoint ended, and a full disk is a message, not a traceback.

A repeated ``--experiment`` is refused (with the ``--resume`` command that continues it) rather than renamed: scripts
and the README's teacher -> student recipe read ``<output>/<experiment>/model.safetensors`` by name, and a quietly
renamed run would leave them reading the old one. Without ``--experiment`` the name is timm's timestamp, and a
clash picks a fresh name (``-1``, ``-2``, ... as ``timm.utils.get_outdir(inc=True)`` does).
"""
import argparse
import csv
import errno
import glob
import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

from .._atomic import atomic_write, remove_partial_writes
from ..errors import UsageError
from ..losses import loss_options

__all__ = [
    'check_output_path', 'create_run_folder', 'check_resume_matches', 'check_resume_distill', 'trim_summary',
    'disk_full_is_usage_error',
]

# files that mean "this folder holds a run's results"; args.yaml alone (a run stopped before its first epoch) does not
_SAVED_WORK = ('last.pth.tar', 'model_best.pth.tar', 'model', 'model.safetensors', 'summary.csv', 'checkpoint-*.pth.tar')

# how torch's zip writer (caffe2's inline_container.cc) words a failed write
_TORCH_WRITER_FAILURES = ('inline_container.cc', 'PytorchStreamWriter')

# flags that decide what a checkpoint holds: resuming under others cannot load it (the loss's options and the
# stages are `check_resume_distill`'s)
_RESUME_FLAGS = ('model', 'distill', 'teacher')
# the stage flags, and what a run records of them: the stage names they resolved to ('auto' included)
_STAGE_FLAGS = (('distill_stages', 'distill_stages_resolved'), ('teacher_stages', 'teacher_stages_resolved'))


def check_output_path(output: str, flag: str = '--output') -> None:
    """Refuse an output folder that cannot be created (a regular file on its path, no write permission), before
    anything is built; ``flag`` names it in the message."""
    probe = os.path.abspath(output)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UsageError(f"{flag} '{output}': '{probe}' is a file, not a folder; pass a path in a folder.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} '{output}': no permission to write in '{probe}'; pass a folder you can write to.")


def _saved_work(folder: str) -> list:
    return sorted(os.path.basename(p) for pattern in _SAVED_WORK for p in glob.glob(os.path.join(folder, pattern)))


def create_run_folder(output: str, experiment: str, default_name: str, resume: str) -> str:
    """Create and return the run folder; refuse one that holds another run unless ``resume`` continues it."""
    folder = os.path.join(output, experiment or default_name)
    saved = _saved_work(folder) if os.path.isdir(folder) else []
    continues = bool(resume) and os.path.dirname(os.path.abspath(resume)) == os.path.abspath(folder)
    if saved and not continues:
        if not experiment:  # timm's timestamp name clashed: a fresh name is what the user asked for
            suffix = 1
            while os.path.exists(f'{folder}-{suffix}'):
                suffix += 1
            folder = f'{folder}-{suffix}'
        else:
            raise UsageError(
                f"--experiment '{experiment}': '{folder}' already holds a run ({', '.join(saved[:3])}); continue it "
                f"with --resume {os.path.join(folder, 'last.pth.tar')}, or pass another --experiment."
            )
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--output: cannot create the run folder '{folder}' ({e.strerror}); pass another --output.") from e
    remove_partial_writes(folder)  # a run killed while saving left its temp files here
    return folder


def check_resume_matches(path: str, saved_args: Optional[argparse.Namespace], args: argparse.Namespace) -> None:
    """Refuse ``--resume`` of a run whose model, method or teacher differ from this command's: its checkpoint cannot
    load into what this command builds."""
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


def check_resume_distill(
        path: str,
        saved_args: Optional[argparse.Namespace],
        args: argparse.Namespace,
        option_flag: Callable[[str], str],
) -> None:
    """Refuse ``--resume`` of a run distilled with other loss options or other stages than this command's task
    (``args`` with the records of ``training.run.RECORDED_ARGS``): resuming would change the loss half-way. Values
    are compared, not spellings: a default given explicitly, or stages named as ``auto`` picked them, pass.
    ``option_flag`` names the flag of a loss option in the message."""
    if saved_args is None or getattr(args, 'distill', 'none') == 'none':
        return
    then_options = getattr(saved_args, 'distill_options', None) or {}
    declared = loss_options(args.distill).options
    for name, now in getattr(args, 'distill_options', {}).items():
        if name in declared and not declared[name].changes_loss:  # a backend: the same loss, computed elsewhere
            continue
        if name in then_options and then_options[name] != now:
            flag = option_flag(name)
            raise UsageError(f"--resume '{path}' is a run with {flag} {then_options[name]}, this command has {flag} "
                             f"{now}; resume with {flag} {then_options[name]}, or start a new --experiment without "
                             "--resume.")
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


def trim_summary(path: str, start_epoch: int) -> None:
    """Keep the rows of ``summary.csv`` before ``start_epoch``: a run killed after writing an epoch's row but before
    its checkpoint repeats that epoch when resumed, and each epoch must appear once."""
    if not os.path.exists(path):
        return
    with open(path, newline='') as f:
        reader = csv.DictReader(f)
        every_row = list(reader)
    rows = [row for row in every_row if int(row['epoch']) < start_epoch]
    if len(rows) == len(every_row):  # the usual resume: nothing to drop, nothing to rewrite
        return
    fields = reader.fieldnames
    with atomic_write(path) as tmp_path:
        with open(tmp_path, 'w', newline='') as f:
            if fields:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(rows)


@contextmanager
def disk_full_is_usage_error(folder: str) -> Iterator[None]:
    """A full disk (or quota) while saving: remove the partial temp files and say how to continue; the files saved
    before are intact, since every write replaces its target only when complete."""
    resume = f"continue with --resume {os.path.join(folder, 'last.pth.tar')}"
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        remove_partial_writes(folder)
        raise UsageError(f"No space left on the device of '{folder}' while saving ({e.strerror}); the files saved "
                         f"before are intact: free space, then {resume}.") from e
    except RuntimeError as e:
        # torch.save's zip writer reports a failed write (a full disk among them) as a RuntimeError without errno
        if not any(mark in str(e) for mark in _TORCH_WRITER_FAILURES):
            raise
        remove_partial_writes(folder)
        raise UsageError(f"torch could not write a checkpoint in '{folder}' ({str(e).splitlines()[0]}): the disk may "
                         f"be full; the files saved before are intact: free space, then {resume}.") from e
