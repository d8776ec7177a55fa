"""Files that survive a crash: every write goes to a temp file in the same folder, is fsynced, and then atomically
replaces the target, so a process killed while writing leaves the previous file readable. A folder written as a unit
(`replace_folder`) is built beside its target and swapped in. Every file gets the mode a plain ``open()`` gives it
(0666 less the umask), not the owner-only mode of a temp file.

Names are replaced, never written through: a symlink where a file or folder is written is itself replaced (with a
warning naming it and its target) and a symlink that is removed goes itself, so no write or removal ever reaches a
file or folder elsewhere that a link in the folder points to (the user's, maybe the only copy).

Test-only hook: ``TSD_TEST_PAUSE_IN_SAVE=<seconds>`` sleeps after a temp file is written and before it is renamed
(but not for the run's records, args.yaml and summary.csv), so a test can kill the process mid-save. Never set it
outside tests.
"""
import contextlib
import fnmatch
import glob
import logging
import os
import shutil
import tempfile
import time
from typing import Dict, Iterator, Optional

import torch
from safetensors.torch import save_file

__all__ = [
    'atomic_write', 'save_safetensors_atomic', 'new_folder_for', 'replace_folder', 'remove_partial_writes',
    'remove_path', 'rename_over', 'warn_if_symlink', 'fsync_file', 'fsync_dir', 'pause_for_tests', 'umask',
]

_logger = logging.getLogger(__name__)

PAUSE_ENV = 'TSD_TEST_PAUSE_IN_SAVE'


def fsync_file(path: str) -> None:
    with open(path, 'rb') as f:
        os.fsync(f.fileno())


def fsync_dir(path: str) -> None:
    """Persist a rename: fsync the folder (not possible on every platform, hence best effort)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def pause_for_tests() -> None:
    seconds = float(os.environ.get(PAUSE_ENV) or 0)
    if seconds > 0:
        _logger.warning(f"{PAUSE_ENV}={seconds}: pausing before the rename (test-only hook).")
        time.sleep(seconds)


def umask() -> int:
    """The process's umask (read without changing it where Linux tells it, else set and restored at once)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open('/proc/self/status') as f:
            return int(next(line for line in f if line.startswith('Umask:')).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def warn_if_symlink(path: str, what: str = 'file') -> None:
    """Say that the symlink ``path``, about to be replaced by a ``what`` of the run's own, goes and its target stays:
    the user may have made the link on purpose, and would otherwise miss that the run no longer writes there."""
    if os.path.islink(path):
        target = os.readlink(path)
        _logger.warning(f"'{path}' is a symbolic link to '{target}': the run replaces the link by a {what} of its own "
                        f"and leaves '{target}' as it is.")


def remove_path(path: str) -> None:
    """Remove the file, symlink or folder ``path``; a symlink goes itself, never its target (rmtree refuses a link to
    a folder, and following it would delete what the link points to)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def rename_over(src: str, dst: str, pause: bool = True) -> None:
    """Atomically put the complete file ``src`` in the place of the name ``dst`` (a symlink there is replaced, not
    written through), and persist the rename; ``pause``: `pause_for_tests` first."""
    if pause:
        pause_for_tests()
    warn_if_symlink(dst)
    os.replace(src, dst)
    fsync_dir(os.path.dirname(os.path.abspath(dst)))


def _replace_durably(tmp_path: str, path: str, pause: bool) -> None:
    """Give ``tmp_path`` the mode of a file made by ``open()``, fsync it, then atomically rename it over ``path``."""
    os.chmod(tmp_path, 0o666 & ~umask())  # mkstemp (and safetensors' own temp file) make it owner-only
    fsync_file(tmp_path)
    rename_over(tmp_path, path, pause)


# the temp names: atomic_write's, safetensors' own (.tmpXXXXXX, renamed onto atomic_write's), and timm's
# CheckpointSaver's (tmp.pth.tar)
_TEMP_PATTERNS = ('.*.tmp', '.tmp*', 'tmp.pth.tar')
# replace_folder's names for the folder being built and for the one it replaces, beside <name>
_NEW_FOLDER, _OLD_FOLDER = '.{}.new', '.{}.old'


def _sibling(folder: str, pattern: str) -> str:
    folder = os.path.abspath(folder)
    return os.path.join(os.path.dirname(folder), pattern.format(os.path.basename(folder)))


def new_folder_for(folder: str) -> str:
    """An empty folder beside ``folder`` to build its next version in, for `replace_folder`."""
    new = _sibling(folder, _NEW_FOLDER)
    if os.path.lexists(new):  # what a killed writer left
        remove_path(new)
    os.mkdir(new)
    return new


def replace_folder(new: str, folder: str) -> None:
    """Put the complete folder ``new`` (from `new_folder_for`, its files written with `atomic_write`, so on disk) in
    the place of ``folder``, as a unit.

    POSIX cannot rename a folder over another: the old one moves aside first. A process killed between the two
    renames leaves no ``folder`` but its old version beside it, which `remove_partial_writes` puts back. A symlink
    ``folder`` is replaced by the new folder; the folder it points to is left as it is.
    """
    old = _sibling(folder, _OLD_FOLDER)
    if os.path.lexists(old):
        remove_path(old)
    if os.path.lexists(folder):
        warn_if_symlink(folder, 'folder')
        os.rename(folder, old)
    os.rename(new, folder)
    fsync_dir(os.path.dirname(os.path.abspath(folder)))
    if os.path.lexists(old):
        remove_path(old)


def remove_partial_writes(folder: str) -> None:
    """Undo what a process killed while saving left in ``folder``: delete its temp files (a checkpoint's worth of
    bytes each, here and in subfolders) and half-built folders, and put back a folder that `replace_folder` had
    moved aside. Symlinked folders are not entered: what they hold is not the run's."""
    for old in glob.glob(os.path.join(folder, _OLD_FOLDER.format('*'))):
        target = os.path.join(folder, os.path.basename(old)[1:-len('.old')])
        if os.path.lexists(target):
            remove_path(old)
        else:
            _logger.info(f"Restoring '{target}' from '{old}', which an interrupted run had moved aside.")
            os.rename(old, target)
    for new in glob.glob(os.path.join(folder, _NEW_FOLDER.format('*'))):
        _logger.info(f"Removing '{new}', a partial write of an interrupted run.")
        remove_path(new)
    # os.walk lists a symlink to a folder without entering it (glob's '**' would enter it); a symlink with a temp
    # name (a dangling one too, which a later save would write through) is among the files and goes itself
    paths = {os.path.join(root, name) for root, _, names in os.walk(folder)
             for name in names if any(fnmatch.fnmatchcase(name, pattern) for pattern in _TEMP_PATTERNS)}
    for path in sorted(paths):
        _logger.info(f"Removing '{path}', a partial write of an interrupted run.")
        os.unlink(path)


@contextlib.contextmanager
def atomic_write(path: str, pause: bool = True) -> Iterator[str]:
    """``with atomic_write(path) as tmp: write(tmp)``: ``path`` changes only once ``tmp`` is complete on disk.

    ``pause=False`` skips `pause_for_tests`, for the run's records (args.yaml, summary.csv): the hook's tests stop a
    run in its checkpoint's save, and a pause before it would only hold them up."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=folder)
    os.close(fd)
    try:
        yield tmp_path
        _replace_durably(tmp_path, path, pause)
    finally:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)


def save_safetensors_atomic(state_dict: Dict[str, torch.Tensor], path: str, metadata: Optional[Dict[str, str]] = None) -> None:
    """Write a safetensors file atomically; tensors are copied to the CPU, contiguous, each with its own storage
    (safetensors refuses shared storage)."""
    tensors = {k: v.detach().to('cpu', copy=True).contiguous() for k, v in state_dict.items()}
    with atomic_write(path) as tmp_path:
        save_file(tensors, tmp_path, metadata=metadata)
