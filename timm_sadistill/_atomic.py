"""Files that survive a crash: every write goes to a temp file in the same folder, is fsynced, and then atomically
replaces the target, so a process killed while writing leaves the previous file readable.

Test-only hook: ``TSD_TEST_PAUSE_IN_SAVE=<seconds>`` sleeps after a temp file is written and before it is renamed,
so a test can kill the process mid-save. Never set it outside tests.
"""
import contextlib
import glob
import logging
import os
import tempfile
import time
from typing import Dict, Iterator, Optional

import torch
from safetensors.torch import save_file

__all__ = ['atomic_write', 'save_safetensors_atomic', 'remove_partial_writes', 'fsync_file', 'fsync_dir', 'pause_for_tests']

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


def _replace_durably(tmp_path: str, path: str) -> None:
    """fsync ``tmp_path``, then atomically rename it over ``path``."""
    fsync_file(tmp_path)
    pause_for_tests()
    os.replace(tmp_path, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


# the temp names: atomic_write's, and timm's CheckpointSaver's (tmp.pth.tar)
_TEMP_PATTERNS = ('.*.tmp', 'tmp.pth.tar')


def remove_partial_writes(folder: str) -> None:
    """Delete the temp files a process killed while saving left in ``folder`` and its subfolders (a run's model
    folder), a checkpoint's worth of bytes each."""
    for pattern in _TEMP_PATTERNS:
        for path in glob.glob(os.path.join(folder, '**', pattern), recursive=True):
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
