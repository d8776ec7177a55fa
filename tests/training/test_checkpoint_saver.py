"""The crash-safe checkpoint saver: a save cut off after ``last`` is written is finished by the resume, so the resumed
run ranks and exports as the run left alone would."""
import os

import pytest
import torch

from timm_sadistill._checkpoint_checks import load_checkpoint
from timm_sadistill.training.checkpoint_saver import AtomicCheckpointSaver


def saver_in(folder) -> AtomicCheckpointSaver:
    model = torch.nn.Linear(2, 2)
    return AtomicCheckpointSaver(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                 checkpoint_dir=str(folder), recovery_dir=str(folder), max_history=3)


def epoch_of(path) -> int:
    return load_checkpoint(str(path)).get('epoch')


@pytest.mark.parametrize('stopped_after', ['last', 'numbered copy'])
def test_a_resume_finishes_a_best_epochs_save_that_a_stop_cut_off(tmp_path, stopped_after):
    saver = saver_in(tmp_path)
    saver.save_checkpoint(0, metric=50.0)
    # epoch 1, the better one, stopped part-way through its save: after last, or after its numbered copy too
    saver._save(str(tmp_path / 'tmp.pth.tar'), 1, 60.0)
    saver._replace(str(tmp_path / 'tmp.pth.tar'), str(tmp_path / 'last.pth.tar'))
    if stopped_after == 'numbered copy':
        saver._duplicate(str(tmp_path / 'last.pth.tar'), saver._checkpoint_path(1))
    assert epoch_of(tmp_path / 'model_best.pth.tar') == 0

    resumed = saver_in(tmp_path)
    resumed.load_state_dict_from_checkpoint(str(tmp_path / 'last.pth.tar'))
    assert (resumed.best_epoch, resumed.best_metric) == (1, 60.0)
    assert epoch_of(tmp_path / 'model_best.pth.tar') == 1 and epoch_of(resumed._checkpoint_path(1)) == 1
    assert [os.path.basename(f) for f, _ in resumed.checkpoint_files] == ['checkpoint-1.pth.tar', 'checkpoint-0.pth.tar']


def test_a_resume_after_a_complete_save_writes_nothing(tmp_path, monkeypatch):
    saver = saver_in(tmp_path)
    saver.save_checkpoint(0, metric=50.0)
    saver.save_checkpoint(1, metric=40.0)
    resumed = saver_in(tmp_path)
    monkeypatch.setattr(resumed, '_duplicate', lambda *a: pytest.fail('a complete save was written again'))
    resumed.load_state_dict_from_checkpoint(str(tmp_path / 'last.pth.tar'))
    assert (resumed.best_epoch, resumed.best_metric) == (0, 50.0)
