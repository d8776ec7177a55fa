"""Every common mistake exits 2 with one line that names the flag or file and the fix, and changes nothing saved.

In-process ``main([...])`` calls keep each case cheap; one subprocess proves the exit status and the missing
traceback end to end. An unexpected exception is a traceback (exit 1), never dressed as a user error.
"""
import errno
import hashlib
import logging
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
from PIL import Image

import timm_sadistill as tsd
from timm_sadistill.cli import main

REPO_ROOT = Path(__file__).resolve().parents[2]
STUDENT = 'test_resnet'
FLAGS = ['--model', STUDENT, '--img-size', '32', '-b', '4', '-j', '0', '--epochs', '1', '--lr', '0.01',
         '--warmup-epochs', '0', '--device', 'cpu']


def write_folder(root: Path, classes: int = 3, per_class: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for split in ('train', 'validation'):
        for k in range(classes):
            folder = root / split / f'c{k}'
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f'{i}.png')
    return root


def digests(folder: Path) -> Dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob('*')) if p.is_file()}



def run_main(argv: List[str], capsys) -> str:
    """Run ``timm-sadistill argv`` in-process; the error line (asserted to be the only one, and the last)."""
    try:
        status = main(argv)
    except SystemExit as e:  # argparse exits itself
        status = e.code
    err = capsys.readouterr().err
    assert status == 2, err[-3000:]
    assert 'Traceback' not in err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if ': error: ' in line]
    assert errors == [lines[-1]], err[-3000:]
    return lines[-1]


@pytest.fixture(scope='module')
def run(tmp_path_factory) -> Path:
    """A finished 1-epoch run (3 classes) in out/done: the folder that mistakes must leave as it is."""
    root = tmp_path_factory.mktemp('user_errors')
    write_folder(root / 'data')
    assert main(['train', '--data-dir', str(root / 'data'), '--num-classes', '3', '--output', str(root / 'out'),
                 '--experiment', 'done'] + FLAGS) == 0
    logging.root.handlers.clear()
    return root


def test_train_mistakes_are_one_line_and_change_nothing(run, capsys, tmp_path):
    done = run / 'out' / 'done'
    before = digests(run / 'out')
    (tmp_path / 'file').write_text('x')
    (tmp_path / 'broken.yaml').write_text('epochs: [1\n')
    common = ['train', '--data-dir', str(run / 'data'), '--output', str(run / 'out')] + FLAGS
    cases = {
        '--num-classes 2 is below the 3 class folders': ['--num-classes', '2', '--experiment', 'a'],
        '--epochs must be at least 1, got 0': ['--num-classes', '3', '--epochs', '0'],
        '--resume': ['--num-classes', '3', '--model', 'resnet18', '--experiment', 'done',
                     '--resume', str(done / 'last.pth.tar')],
        "is a file, not a folder": ['--output', str(tmp_path / 'file' / 'out')],
        '--device cuda: no CUDA GPU': ['--device', 'cuda'],
        "is not valid YAML at line": ['-c', str(tmp_path / 'broken.yaml')],
        '--sa-tau must be a finite number, got nan': ['--distill', 'sa', '--sa-tau', 'nan'],
        '--dkd-beta must be >= 0, got -1.0': ['--distill', 'dkd', '--dkd-beta', '-1'],
        '--fitnet-weight: an option of --distill fitnet, but the method is --distill kd': [
            '--distill', 'kd', '--fitnet-weight', '3'],
        '--lr must be a finite number, got nan': ['--lr', 'nan'],
        "is a folder, not a checkpoint file": ['--distill', 'kd', '--teacher', 'resnet18', '--teacher-checkpoint', str(done)],
        f"invalid choice: 'nope' (choose from {', '.join(map(repr, ['none', *tsd.list_distill_losses()]))})": [
            '--distill', 'nope'],
        "--experiment 'done': ": ['--num-classes', '3', '--experiment', 'done'],
    }
    for expected, flags in cases.items():
        if torch.cuda.is_available() and expected.startswith('--device cuda'):
            continue
        line = run_main(common + flags, capsys)
        assert line.startswith('timm-sadistill train: error: ') and expected in line, (expected, line)
    assert digests(run / 'out') == before
    assert sorted(p.name for p in (run / 'out').iterdir()) == ['done']


def test_repeating_an_experiment_is_refused_and_points_to_resume(run, capsys):
    done = run / 'out' / 'done'
    line = run_main(['train', '--data-dir', str(run / 'data'), '--num-classes', '3', '--output', str(run / 'out'),
                     '--experiment', 'done'] + FLAGS, capsys)
    assert f"continue it with --resume {done / 'last.pth.tar'}, or pass another --experiment" in line


def _oserror_on_full_disk(obj, path, *args, **kwargs):  # the disk fills up half-way through the checkpoint
    Path(path).write_bytes(b'partial')
    raise OSError(errno.ENOSPC, 'No space left on device')


def _torch_writer_on_full_disk(obj, path, *args, **kwargs):
    """torch's zip writer on a full disk raises a RuntimeError without errno; the text is that of a real one
    (torch.save to /dev/full, torch 2.14), which does not fail reliably enough to be the test itself."""
    Path(path).write_bytes(b'partial')
    raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598')


@pytest.mark.parametrize('save, words', [
    (_oserror_on_full_disk, "No space left on the device of '{folder}' while saving (No space left on device)"),
    (_torch_writer_on_full_disk, "torch could not write a checkpoint in '{folder}' ("),
], ids=['OSError', 'torch writer'])
def test_a_full_disk_while_saving_is_one_line_and_keeps_the_saved_files(run, capsys, tmp_path, monkeypatch, save,
                                                                         words):
    import shutil
    folder = tmp_path / 'done'
    shutil.copytree(run / 'out' / 'done', folder)
    before = digests(folder)
    summary_before = (folder / 'summary.csv').read_text()

    monkeypatch.setattr(torch, 'save', save)
    line = run_main(['train', '--data-dir', str(run / 'data'), '--num-classes', '3', '--output', str(tmp_path),
                     '--experiment', 'done', '--resume', str(folder / 'last.pth.tar')] + FLAGS + ['--epochs', '2'],
                    capsys)
    assert line.startswith('timm-sadistill train: error: ' + words.format(folder=folder))
    assert line.endswith(f"the files saved before are intact: free space, then continue with --resume "
                         f"{folder / 'last.pth.tar'}.")
    assert (folder / 'summary.csv').read_text().startswith(summary_before)
    after = digests(folder)
    for name in ('summary.csv', 'args.yaml'):  # a resumed run appends its epoch's row and records its own flags
        before.pop(name), after.pop(name)
    assert after == before  # no checkpoint or export changed, no partial temp file left behind


def test_viz_mistakes_are_one_line(run, capsys, tmp_path):
    image = tmp_path / 'img.png'
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image)
    data = image.read_bytes()
    (tmp_path / 'truncated.png').write_bytes(data[:len(data) // 2])
    (tmp_path / 'file').write_text('x')
    common = ['viz', '--model', STUDENT, '--teacher', 'resnet18', '--num-classes', '3', '--img-size', '32']
    cases = {
        "cannot be decoded": [str(tmp_path / 'truncated.png'), '-o', str(tmp_path / 'a.png')],
        "-o/--output": [str(image), '-o', str(tmp_path / 'file' / 'a.png')],
    }
    for expected, flags in cases.items():
        line = run_main(common + flags, capsys)
        assert line.startswith('timm-sadistill viz: error: ') and expected in line, (expected, line)


def test_a_bug_is_a_traceback_not_a_user_error(monkeypatch):
    import timm_sadistill.cli.train as train

    def bug(*args, **kwargs):
        raise ValueError('an internal mistake')

    monkeypatch.setattr(train, 'train', bug)
    with pytest.raises(ValueError, match='an internal mistake'):
        main(['train', '--model', STUDENT])


def test_the_command_line_exits_2_with_one_line_and_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, '-m', 'timm_sadistill', 'train', '--model', STUDENT, '--epochs', '0'],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={'PYTHONPATH': str(REPO_ROOT), 'HF_HUB_OFFLINE': '1', 'PATH': '/usr/bin:/bin'})
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert result.stderr.strip().splitlines() == ['timm-sadistill train: error: --epochs must be at least 1, got 0.']


class _RunsCode:
    """A pickle payload: loading it unpickled would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f'touch {self.marker}',)


def test_a_checkpoint_that_could_run_code_is_refused_on_every_path_with_one_line(run, capsys, tmp_path):
    import json
    import shutil

    done = run / 'out' / 'done'
    before = digests(run / 'out')
    marker = tmp_path / 'ran'
    payload = {'state_dict': {}, 'extra': _RunsCode(marker)}
    evil, legacy = tmp_path / 'evil.pth.tar', tmp_path / 'legacy.pth.tar'
    torch.save(payload, evil)
    torch.save(payload, legacy, _use_new_zipfile_serialization=False)
    folder = tmp_path / 'folder'  # a model folder whose weights are such a pickle
    folder.mkdir()
    shutil.copy(done / 'model' / 'config.json', folder / 'config.json')
    shutil.copy(evil, folder / 'pytorch_model.bin')
    common = ['train', '--data-dir', str(run / 'data'), '--num-classes', '3', '--output', str(tmp_path / 'out')] + FLAGS
    cases = [
        (evil, common + ['--resume', str(evil)]),
        (legacy, common + ['--initial-checkpoint', str(legacy)]),
        (evil, common + ['--distill', 'kd', '--teacher', 'resnet18', '--teacher-checkpoint', str(evil)]),
        (folder / 'pytorch_model.bin', common + ['--model', f'local-dir:{folder}']),
    ]
    lines = [(path, run_main(argv, capsys)) for path, argv in cases]
    lines.append((evil, run_main(['viz', '--model', STUDENT, '--teacher', 'resnet18', '--num-classes', '3',
                                  '--img-size', '32', '--checkpoint', str(evil), str(evil), '-o',
                                  str(tmp_path / 'maps.png')], capsys)))
    for path, line in lines:
        assert f"'{path}' was not loaded: it holds more than weights (a pickled posix.system), and loading it could " \
               "run code. Pass a safetensors file or plain weights" in line, line
    assert not marker.exists() and not (tmp_path / 'out').exists() and digests(run / 'out') == before


def test_timm_train_given_a_folder_says_it_is_one(capsys, tmp_path):
    (tmp_path / 'timm').mkdir()
    (tmp_path / 'timm' / 'train.py').write_text('')
    line = run_main(['timm-train', str(tmp_path / 'timm'), '--kd-model-name', 'resnet18'], capsys)
    assert line == (f"timm-sadistill timm-train: error: train.py '{tmp_path / 'timm'}' is a folder, not a script; pass "
                    f"the path of timm's train.py as the first argument, e.g. {tmp_path / 'timm' / 'train.py'}.")
