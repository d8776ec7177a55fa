"""Exact resume: a run stopped anywhere (mid-epoch, mid-save, by SIGTERM or kill -9) and resumed from its folder ends
with the weights of the same run left alone, bit for bit on the CPU, with and without loader workers."""
import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from test_cli import cli_env
from test_run_folders import epochs
from test_user_errors import STUDENT, write_folder


def weights_digest(model_folder: Path) -> str:
    """One hash of every tensor of an exported student (names, dtypes, shapes and bytes; not the file's metadata)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(load_file(model_folder / 'model.safetensors').items()):
        digest.update(f'{name}{tensor.dtype}{tuple(tensor.shape)}'.encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize('workers, stop', [('0', signal.SIGKILL), ('2', signal.SIGTERM)])
def test_a_run_stopped_anywhere_and_resumed_ends_with_the_weights_of_the_run_left_alone(tmp_path, workers, stop):
    write_folder(tmp_path / 'data', per_class=8)  # 24 images in batches of 4: six steps an epoch to stop inside
    command = [sys.executable, '-m', 'timm_sadistill', 'train', '--data-dir', str(tmp_path / 'data'), '--num-classes',
               '3', '--output', str(tmp_path / 'out'), '--model', STUDENT, '--img-size', '32', '-b', '4', '-j', workers,
               '--epochs', '3', '--lr', '0.01', '--warmup-epochs', '0', '--device', 'cpu', '--seed', '3',
               '--drop', '0.2', '--mixup', '0.2']  # dropout and mixup draw numbers too
    alone = subprocess.run(command + ['--experiment', 'alone'], env=cli_env(), capture_output=True, text=True,
                           timeout=300)
    assert alone.returncode == 0, alone.stderr[-3000:]

    folder = tmp_path / 'out' / 'stopped'
    process = subprocess.Popen(command + ['--experiment', 'stopped'], env=cli_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (folder / 'last.pth.tar').exists():  # the first checkpoint: then stop wherever the run is
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()[-3000:]
        time.sleep(0.05)
    process.send_signal(stop)
    _, err = process.communicate(timeout=120)
    assert process.returncode in (-signal.SIGKILL, 128 + signal.SIGTERM, 0), err[-3000:]
    resumed = subprocess.run(command + ['--experiment', 'stopped', '--resume', str(folder / 'last.pth.tar')],
                             env=cli_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    assert epochs(folder) == ['0', '1', '2']
    assert weights_digest(folder / 'model') == weights_digest(tmp_path / 'out' / 'alone' / 'model')
    # the epochs after the stop trained on the same batches: the same losses in summary.csv
    assert (folder / 'summary.csv').read_text() == (tmp_path / 'out' / 'alone' / 'summary.csv').read_text()
