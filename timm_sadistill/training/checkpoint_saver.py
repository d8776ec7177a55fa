"""Checkpoints that survive a crash: timm's `CheckpointSaver` with the writes of `timm_sadistill._atomic` (temp file,
fsync, atomic rename), so a run killed while saving leaves the previous checkpoint readable, and a symlink in the run
folder is replaced, never written through."""
import os
import shutil
from contextlib import suppress

from timm.utils import CheckpointSaver

from .._atomic import atomic_write, fsync_file, remove_partial_writes, rename_over, save_safetensors_atomic
from .._checkpoint_checks import load_checkpoint

__all__ = ['atomic_write', 'AtomicCheckpointSaver', 'save_safetensors_atomic', 'remove_partial_writes']


def _epoch_of(checkpoint: str):
    """The epoch a timm checkpoint holds (its pickled structure read, memory-mapped, not its tensors)."""
    return load_checkpoint(checkpoint).get('epoch')


class AtomicCheckpointSaver(CheckpointSaver):
    """timm's `CheckpointSaver` (same files, layout and history bookkeeping) with crash-safe writes.

    timm's saver writes ``tmp.pth.tar`` and renames it, but it unlinks the target before the rename and copies
    ``model_best`` by unlink + hardlink, so a crash at the wrong moment leaves no ``last`` or ``model_best``; nor does
    it fsync. Here every file appears only by an atomic rename of a complete, fsynced temp file.
    """

    def save_checkpoint(self, epoch: int, metric=None):
        """timm's: the state as ``last``, then its place in the ranked history (`_retain`); (best metric, its
        epoch), both None until a ranked checkpoint has been saved."""
        assert epoch >= 0
        tmp_save_path = os.path.join(self.checkpoint_dir, 'tmp' + self.extension)
        self._save(tmp_save_path, epoch, metric)
        self._replace(tmp_save_path, self._last_path())
        self._retain(epoch, metric)
        return (None, None) if self.best_metric is None else (self.best_metric, self.best_epoch)

    def _retain(self, epoch: int, metric=None) -> None:
        """What timm's ``save_checkpoint`` does after ``last`` is written: a numbered copy of it when it earns a place
        in the history (evicting the worst), and ``model_best`` when it is the best."""
        worst = self.checkpoint_files[-1] if self.checkpoint_files else None
        if len(self.checkpoint_files) < self.max_history or worst[1] is None or (
                metric is not None and self.cmp(metric, worst[1])):
            if len(self.checkpoint_files) >= self.max_history:
                self._cleanup_checkpoints(1)
            save_path = self._checkpoint_path(epoch)
            self._duplicate(self._last_path(), save_path)
            self._track_checkpoint(save_path, epoch, metric)

    def load_state_dict(self, state_dict) -> None:
        """timm's restore of the history; and when ``last`` is the checkpoint whose save the state was taken in, the
        part of that save a stop cut off (before its numbered copy, or before ``model_best``) is done now: else the
        resumed run would rank its epochs against a history without it, and export another best epoch than the run
        left alone."""
        super().load_state_dict(state_dict)  # tracks the pending checkpoint where its numbered copy exists
        epoch, metric = state_dict.get('pending', (None, None))
        last = self._last_path()
        if epoch is None or not os.path.isfile(last) or _epoch_of(last) != epoch:
            return
        best = os.path.join(self.checkpoint_dir, 'model_best' + self.extension)
        if not os.path.exists(self._checkpoint_path(epoch)):
            self._retain(epoch, metric)
        elif self.best_epoch == epoch and (not os.path.isfile(best) or _epoch_of(best) != epoch):
            self._duplicate(last, best)

    def _last_path(self) -> str:
        return os.path.join(self.checkpoint_dir, 'last' + self.extension)

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
