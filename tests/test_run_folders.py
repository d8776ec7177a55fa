"""Run folders: a resumed run has each epoch once in summary.csv (with its header, also in a new --experiment), and no
partial temp file of a killed save survives a restart."""
import csv
import logging
from pathlib import Path

import pytest

from timm_sadistill.cli import main
from test_user_errors import FLAGS, write_folder


@pytest.fixture(autouse=True)
def _keep_logging():
    handlers = list(logging.root.handlers)
    yield
    logging.root.handlers[:] = handlers


def epochs(folder: Path) -> list:
    with open(folder / 'summary.csv', newline='') as f:
        return [row['epoch'] for row in csv.DictReader(f)]


def test_resume_after_a_kill_mid_save_keeps_each_epoch_once_and_no_temp_file(tmp_path):
    write_folder(tmp_path / 'data')
    common = ['train', '--data-dir', str(tmp_path / 'data'), '--num-classes', '3', '--output', str(tmp_path)] + FLAGS
    assert main(common + ['--experiment', 'run']) == 0
    folder = tmp_path / 'run'
    # as a kill after epoch 1's summary row and during its checkpoint write leaves the folder
    with open(folder / 'summary.csv', 'a') as f:
        f.write('1' + ',0' * (len((folder / 'summary.csv').read_text().splitlines()[0].split(',')) - 1) + '\n')
    (folder / 'tmp.pth.tar').write_bytes(b'x' * 1000)
    (folder / '.model.safetensors.abc123.tmp').write_bytes(b'x' * 1000)
    assert main(common + ['--experiment', 'run', '--epochs', '2', '--resume', str(folder / 'last.pth.tar')]) == 0
    assert epochs(folder) == ['0', '1']
    assert not (folder / 'tmp.pth.tar').exists() and not list(folder.glob('.*.tmp'))

    # resuming into a new experiment starts a summary.csv of its own, header first
    assert main(common + ['--experiment', 'next', '--epochs', '3', '--resume', str(folder / 'last.pth.tar')]) == 0
    assert epochs(tmp_path / 'next') == ['2']
