"""Checkpoints that survive a crash: timm's `CheckpointSaver` with the writes of `timm_sadistill._atomic` (temp file,
fsync, atomic rename), so a run killed while saving leaves the previous checkpoint readable, and a symlink in the run
folder is replaced, never written through."""
import os
import shutil
from contextlib import suppress

from timm.utils import CheckpointSaver

from .._atomic import atomic_write, fsync_file, remove_partial_writes, rename_over, save_safetensors_atomic

__all__ = ['atomic_write', 'AtomicCheckpointSaver', 'save_safetensors_atomic', 'remove_partial_writes']


class AtomicCheckpointSaver(CheckpointSaver):
    """timm's `CheckpointSaver` (same files, layout and history bookkeeping) with crash-safe writes.

    timm's saver writes ``tmp.pth.tar`` and renames it, but it unlinks the target before the rename and copies
    ``model_best`` by unlink + hardlink, so a crash at the wrong moment leaves no ``last`` or ``model_best``; nor does
    it fsync. Here every file appears only by an atomic rename of a complete, fsynced temp file.
    """

    def _save(self, save_path: str, epoch: int, metric=None) -> None:
        # torch.save opens timm's fixed temp name (tmp.pth.tar): a symlink left there would be written through
        with suppress(FileNotFoundError):
            os.unlink(save_path)
        super()._save(save_path, epoch, metric)
        fsync_file(save_path)

    def _replace(self, src: str, dst: str) -> None:
        rename_over(src, dst)

    def _duplicate(self, src: str, dst: str) -> None:
        with atomic_write(dst) as tmp_path:
            os.unlink(tmp_path)
            try:
                os.link(src, tmp_path)  # a hardlink costs no space; the rename below makes it appear atomically
            except OSError:
                shutil.copy2(src, tmp_path)
