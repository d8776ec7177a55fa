"""Files that survive a crash: every write goes to a temp file in the same folder, is fsynced, and then atomically
replaces the target, so a process killed while writing leaves the previous file readable. A folder written as a unit
(`replace_folder`) is built beside its target and swapped in. Every file gets the mode a plain ``open()`` gives it
(0666 less the umask), not the owner-only mode of a temp file.

Test-only hook: ``TSD_TEST_PAUSE_IN_SAVE=<seconds>`` sleeps after a temp file is written and before it is renamed,
so a test can kill the process mid-save. Never set it outside tests.
"""
import contextlib
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
    'fsync_file', 'fsync_dir', 'pause_for_tests', 'umask',
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


def _replace_durably(tmp_path: str, path: str) -> None:
    """Give ``tmp_path`` the mode of a file made by ``open()``, fsync it, then atomically rename it over ``path``."""
    os.chmod(tmp_path, 0o666 & ~umask())  # mkstemp (and safetensors' own temp file) make it owner-only
    fsync_file(tmp_path)
    pause_for_tests()
    os.replace(tmp_path, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


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
    if os.path.isdir(new):  # what a killed writer left
        shutil.rmtree(new)
    os.mkdir(new)
    return new


def replace_folder(new: str, folder: str) -> None:
    """Put the complete folder ``new`` (from `new_folder_for`, its files written with `atomic_write`, so on disk) in
    the place of ``folder``, as a unit.

    POSIX cannot rename a folder over another: the old one moves aside first. A process killed between the two
    renames leaves no ``folder`` but its old version beside it, which `remove_partial_writes` puts back.
    """
    old = _sibling(folder, _OLD_FOLDER)
    if os.path.isdir(old):
        shutil.rmtree(old)
    if os.path.exists(folder):
        os.rename(folder, old)
    os.rename(new, folder)
    fsync_dir(os.path.dirname(os.path.abspath(folder)))
    if os.path.isdir(old):
        shutil.rmtree(old)


def remove_partial_writes(folder: str) -> None:
    """Undo what a process killed while saving left in ``folder``: delete its temp files (a checkpoint's worth of
    bytes each, here and in subfolders) and half-built folders, and put back a folder that `replace_folder` had
    moved aside."""
    for old in glob.glob(os.path.join(folder, _OLD_FOLDER.format('*'))):
        target = os.path.join(folder, os.path.basename(old)[1:-len('.old')])
        if os.path.exists(target):
            shutil.rmtree(old)
        else:
            _logger.info(f"Restoring '{target}' from '{old}', which an interrupted run had moved aside.")
            os.rename(old, target)
    for new in glob.glob(os.path.join(folder, _NEW_FOLDER.format('*'))):
        _logger.info(f"Removing '{new}', a partial write of an interrupted run.")
        shutil.rmtree(new)
    paths = {path for pattern in _TEMP_PATTERNS
             for path in glob.glob(os.path.join(folder, '**', pattern), recursive=True)}
    for path in sorted(paths):
        if os.path.isfile(path):
            _logger.info(f"Removing '{path}', a partial write of an interrupted run.")
            os.unlink(path)


@contextlib.contextmanager
def atomic_write(path: str) -> Iterator[str]:
    """``with atomic_write(path) as tmp: write(tmp)``: ``path`` changes only once ``tmp`` is complete on disk."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=folder)
    os.close(fd)
    try:
        yield tmp_path
        _replace_durably(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)


def save_safetensors_atomic(state_dict: Dict[str, torch.Tensor], path: str, metadata: Optional[Dict[str, str]] = None) -> None:
    """Write a safetensors file atomically; tensors are copied to the CPU, contiguous, each with its own storage
    (safetensors refuses shared storage)."""
    tensors = {k: v.detach().to('cpu', copy=True).contiguous() for k, v in state_dict.items()}
    with atomic_write(path) as tmp_path:
        save_file(tensors, tmp_path, metadata=metadata)
