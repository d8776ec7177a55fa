"""The run folder ``<output>/<experiment>/`` of ``train``: one run at a time in it, a finished run is never
overwritten, a crash at any point leaves a folder that the same command (or the ``--resume`` it prints) continues or
restarts, and a full disk is a message, not a traceback.

One run per folder: the run that writes a folder holds an exclusive ``flock`` on its lock file (`LOCK_FILE`, which
names the holder's pid and host) for the life of its process, taken before anything is written; the kernel drops it
when the process dies, however it dies, so a lock file left behind blocks nothing. A second run into a held folder
(the same ``--experiment`` twice, a ``--resume`` of a running run) is refused with the holder's pid.

A repeated ``--experiment`` is refused (with the ``--resume`` command that continues it) rather than renamed: scripts
and the README's teacher -> student recipe read ``<output>/<experiment>/model.safetensors`` by name, and a quietly
renamed run would leave them reading the old one. A folder without a completed checkpoint (a run stopped before its
first save) holds nothing to continue: the same command restarts it. Without ``--experiment`` the name is timm's
timestamp, and a taken name (also by a run started the same second) picks a fresh one (`run_name` says how each
name is spelled), made atomically by ``os.mkdir``. A nested ``--experiment`` (``ablation/run1``) is a folder under
``--output`` like any other; one that would leave ``--output`` (``..``, an absolute path) is refused first
(`check_experiment`).

Every file of the folder is replaced, never written through (`timm_sadistill._atomic`): the lock file is opened
without following a symlink and summary.csv is rewritten, not appended to, so a symlink in the folder is replaced
and its target never changes.
"""
import csv
import errno
import fcntl
import glob
import logging
import os
import shutil
import socket
from contextlib import contextmanager, suppress
from datetime import datetime
from typing import Dict, Iterator, List, Optional, Sequence

from safetensors import SafetensorError
from timm.utils import update_summary

from .._atomic import atomic_write, remove_partial_writes, warn_if_symlink
from ..errors import UsageError
from .run_name import run_folder_name

__all__ = [
    'LOCK_FILE', 'LAST_CHECKPOINT', 'CHECKPOINT_FILES', 'RunFolder', 'check_output_path', 'check_experiment',
    'create_run_folder', 'continue_hint', 'present_files', 'append_summary', 'trim_summary', 'disk_full_is_usage_error',
]

_logger = logging.getLogger(__name__)

LOCK_FILE = '.lock'
# flock's errors on a file system without locks (some network and FUSE mounts): the run goes on unlocked
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)
LAST_CHECKPOINT = 'last.pth.tar'

# the files of a completed checkpoint, and the rest of a run's results: a folder with neither holds nothing to keep
CHECKPOINT_FILES = (LAST_CHECKPOINT, 'model_best.pth.tar', 'checkpoint-*.pth.tar')
_SAVED_WORK = CHECKPOINT_FILES + ('model', 'model.safetensors')

# how torch's zip writer (caffe2's inline_container.cc) words a failed write
_TORCH_WRITER_FAILURES = ('inline_container.cc', 'PytorchStreamWriter')
# how safetensors words an OS error (Rust's io::Error: "... (os error 28) ...")
_SAFETENSORS_DISK_FULL = tuple(f'(os error {code})' for code in (errno.ENOSPC, errno.EDQUOT))


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


def check_experiment(experiment: str) -> None:
    """Refuse an ``--experiment`` that puts the run folder outside ``--output`` (an absolute path, a ``..``) or on it
    (``.``), before anything is written: the run writes, cleans up and locks only its own ``<output>/<experiment>``,
    and the resume hints name it so. A nested name (``ablation/run1``) is a folder under ``--output`` like any other.
    """
    if not experiment:
        return
    if os.path.isabs(experiment):
        problem = 'is an absolute path'
    elif '..' in experiment.replace(os.altsep or os.sep, os.sep).split(os.sep):
        problem = "climbs out of --output with '..'"
    elif os.path.normpath(experiment) == '.':
        problem = 'names --output itself'
    else:
        return
    raise UsageError(f"--experiment '{experiment}' {problem}: a run folder is <output>/<experiment>; pass a name under "
                     "--output (e.g. ablation/run1), and pick the place with --output.")


def present_files(folder: str, patterns: Sequence[str]) -> List[str]:
    """The names in ``folder`` that match any of the glob ``patterns``, sorted."""
    return sorted(os.path.basename(p) for pattern in patterns for p in glob.glob(os.path.join(folder, pattern)))


class RunFolder:
    """A run folder this process holds: ``path``, and its lock, which keeps every other run out until `release`.

    Args:
        path: the run folder.
        lock_fd: the open lock file this process holds the ``flock`` of.
        created: the folders this process made for it, the run folder last (`release` removes them if nothing was
            written in them).
    """

    def __init__(self, path: str, lock_fd: int, created: List[str]):
        self.path = path
        self._lock_fd = lock_fd
        self._created = created

    def release(self) -> None:
        """Drop the lock (the lock file is emptied: only a process that died holding it is left named in it); a
        folder this process made and wrote nothing in (a run refused or stopped during its setup) goes, so that
        nothing of it is left."""
        if self._lock_fd is None:
            return
        if self.path in self._created and os.listdir(self.path) == [LOCK_FILE]:
            os.unlink(os.path.join(self.path, LOCK_FILE))
            with suppress(OSError):  # another run has just taken it over (its lock file is in it), or --output has more
                for folder in reversed(self._created):
                    os.rmdir(folder)
        else:
            with suppress(OSError):
                os.ftruncate(self._lock_fd, 0)
        os.close(self._lock_fd)
        self._lock_fd = None


def _open_lock_file(path: str) -> int:
    """Open (or create) the lock file ``path`` without following a symlink: writing the holder's name through one
    would change its target, so a link in its place is replaced by a lock file of the run's own."""
    while True:
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        except OSError as e:
            if e.errno != errno.ELOOP or not os.path.islink(path):
                raise
            warn_if_symlink(path)
            os.unlink(path)


def _lock(folder: str) -> int:
    """Hold the ``flock`` of ``folder``'s lock file and write this process into it; the open file.

    Raises:
        UsageError: another process holds it.
        FileNotFoundError: ``folder`` went away (a run that made it wrote nothing and removed it).
    """
    path = os.path.join(folder, LOCK_FILE)
    while True:
        fd = _open_lock_file(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with open(path, encoding='utf-8', errors='replace') as f:
                holder = f.read().strip() or 'another process'
            os.close(fd)
            raise UsageError(f"'{folder}' is in use by another run ({holder}); wait for it to end, or pass another "
                             "--experiment.") from None
        except OSError as e:
            if e.errno not in _NO_LOCKS:
                raise
            _logger.warning(f"The file system of '{folder}' cannot lock files ({e.strerror}): nothing keeps a second "
                            "run out of this folder; start one run at a time in it.")
            break
        try:  # the last holder may have removed the file between our open and flock: lock the one now there
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {datetime.now():%Y-%m-%d %H:%M:%S}\n".encode())
    return fd


def _make_parents(output: str, folder: str, experiment: str) -> List[str]:
    """Create ``output`` and the folders a nested ``experiment`` puts above the run folder ``folder``; those this
    call made, outermost first (a run that writes nothing removes them again)."""
    made, parent = [], os.path.dirname(os.path.abspath(folder))
    probe = parent
    while not os.path.exists(probe):
        made.insert(0, probe)
        probe = os.path.dirname(probe)
    try:
        os.makedirs(output, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--output: cannot create '{output}' ({e.strerror}); pass another --output.") from e
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--experiment '{experiment}': cannot create '{parent}' ({e.strerror}); pass another "
                         "--experiment.") from e
    return made


def create_run_folder(output: str, experiment: str, default_name: str, resume: str) -> RunFolder:
    """Make (or reuse) the run folder and hold its lock; refuse one that holds another run unless ``resume``
    continues it, and clean what a crashed run left in it. Without ``experiment`` the folder is ``default_name``
    (`run_name.timestamp_name`), numbered when taken.

    Raises:
        UsageError: the folder is held by a running run, or holds a run's results and ``resume`` is not its
            checkpoint, or cannot be created.
    """
    name, number = experiment or default_name, 0
    while True:
        folder = os.path.join(output, run_folder_name(name, number))
        made = _make_parents(output, folder, experiment)
        try:
            os.mkdir(folder)
            created = made + [folder]
        except FileNotFoundError:  # a folder above it went away (a run that made it for its nested name, then left)
            continue
        except FileExistsError:
            if not experiment:  # timm's timestamp name is taken: a fresh name is what the user asked for
                number += 1
                continue
            created = made
            _refuse_saved_work(folder, experiment, resume)  # before the lock, which would write in the folder
        except OSError as e:
            raise UsageError(f"--output: cannot create the run folder '{folder}' ({e.strerror}); pass another "
                             "--output.") from e
        try:
            lock_fd = _lock(folder)
        except FileNotFoundError:  # it went away between our mkdir and open: try again
            continue
        except NotADirectoryError as e:
            raise UsageError(f"--experiment '{experiment}': '{folder}' is a file; pass another --experiment.") from e
        break
    run = RunFolder(folder, lock_fd, created)
    try:
        if folder not in created:
            _refuse_saved_work(folder, experiment, resume)  # again: another run may have saved in it meanwhile
            _clean_for_restart(folder)
        remove_partial_writes(folder)  # a run killed while saving left its temp files here
    except BaseException:
        run.release()
        raise
    return run


def _refuse_saved_work(folder: str, experiment: str, resume: str) -> None:
    """Refuse a folder with a run's results unless ``resume`` continues it."""
    if resume and os.path.dirname(os.path.abspath(resume)) == os.path.abspath(folder):
        return
    saved = present_files(folder, _SAVED_WORK)
    if not saved:
        return
    checkpoints = present_files(folder, CHECKPOINT_FILES)
    if LAST_CHECKPOINT in checkpoints:
        hint = f'continue it with --resume {os.path.join(folder, LAST_CHECKPOINT)}, or'
    elif checkpoints:
        hint = f'continue it with --resume {os.path.join(folder, checkpoints[-1])}, or'
    else:
        hint = 'it holds no checkpoint to continue from:'
    raise UsageError(f"--experiment '{experiment}': '{folder}' already holds a run ({', '.join(saved[:3])}); {hint} "
                     "pass another --experiment.")


def _clean_for_restart(folder: str) -> None:
    """Empty a folder whose run stopped before its first checkpoint, for the same command to start over in it."""
    if not present_files(folder, CHECKPOINT_FILES) and os.path.exists(os.path.join(folder, 'summary.csv')):
        _logger.info(f"Restarting '{folder}': its run stopped before its first checkpoint.")
        os.unlink(os.path.join(folder, 'summary.csv'))  # rows of epochs that no checkpoint holds


def continue_hint(folder: str, experiment: Optional[str]) -> str:
    """How to go on with the run of ``folder`` after it stopped: the ``--resume`` of its last checkpoint (with the
    ``--experiment`` that writes into this folder again when its name was timm's timestamp), or, with no checkpoint
    yet, the same command again."""
    last = os.path.join(folder, LAST_CHECKPOINT)
    if os.path.isfile(last):
        again = '' if experiment else f' --experiment {os.path.basename(folder)}'
        return f'continue with{again} --resume {last}'
    return 'rerun the same command (nothing was checkpointed yet, so it starts over)'


def append_summary(path: str, epoch: int, train_metrics: Dict[str, float], eval_metrics: Optional[Dict[str, float]],
                   lr: float) -> None:
    """Add timm's ``update_summary`` row of ``epoch`` to summary.csv, with the header in a new or empty file (also
    when --resume starts a new --experiment). timm appends in place, which writes through a symlink and leaves a
    torn row when killed: here a copy that ends in the row replaces the file."""
    with atomic_write(path, pause=False) as tmp_path:
        has_rows = os.path.isfile(path) and os.path.getsize(path) > 0
        if has_rows:
            shutil.copyfile(path, tmp_path)
        update_summary(epoch, train_metrics, eval_metrics, filename=tmp_path, lr=lr, write_header=not has_rows)


def summary_row(output_dir: str, epoch: int) -> Dict[str, str]:
    """The summary.csv row of ``epoch`` in the run folder ``output_dir``: {} when the file or the row is missing."""
    path = os.path.join(output_dir, 'summary.csv')
    if not os.path.isfile(path):
        return {}
    with open(path, newline='') as f:
        return next((row for row in csv.DictReader(f) if row.get('epoch') == str(epoch)), {})


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


def _disk_full(e: Exception, folder: str) -> Optional[str]:
    """The words for a failed write that a full disk (or quota) explains, None for other errors."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"No space left on the device of '{folder}' while saving ({e.strerror})"
    if isinstance(e, SafetensorError) and any(mark in str(e) for mark in _SAFETENSORS_DISK_FULL):
        return f"No space left on the device of '{folder}' while writing weights ({str(e).splitlines()[0][:160]})"
    # torch.save's zip writer reports a failed write (a full disk among them) as a RuntimeError without errno
    if isinstance(e, RuntimeError) and any(mark in str(e) for mark in _TORCH_WRITER_FAILURES):
        return f"torch could not write a checkpoint in '{folder}' ({str(e).splitlines()[0]}): the disk may be full"
    return None


@contextmanager
def disk_full_is_usage_error(folder: str, experiment: Optional[str] = None) -> Iterator[None]:
    """A full disk (or quota) while saving (a checkpoint, the model folder, any file of the run): remove the partial
    writes and say how to continue; the files saved before are intact, since every write replaces its target only
    when complete. ``experiment`` is the run's ``--experiment`` (None: timm's timestamp name)."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as e:
        words = _disk_full(e, folder)
        if words is None:
            raise
        remove_partial_writes(folder)
        raise UsageError(f"{words}; the files saved before are intact: free space, then "
                         f"{continue_hint(folder, experiment)}.") from e
