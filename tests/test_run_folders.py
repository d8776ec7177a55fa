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


# ----------------------------------------------------------------------------------------------------------------
# One run per folder


def test_a_held_folder_is_refused_naming_its_holder_and_a_left_lock_file_blocks_nothing(tmp_path):
    import os
    import socket

    from timm_sadistill.errors import UsageError
    from timm_sadistill.training.run_folder import LOCK_FILE, create_run_folder

    held = create_run_folder(str(tmp_path), 'exp', 'stamp', '')
    (tmp_path / 'exp' / 'args.yaml').write_text('model: test_resnet\n')  # a run that started
    try:
        with pytest.raises(UsageError, match=rf"'{tmp_path / 'exp'}' is in use by another run \(pid {os.getpid()} on "
                                             rf"{socket.gethostname()}, since .*\); wait for it to end"):
            create_run_folder(str(tmp_path), 'exp', 'stamp', '')
        # --resume into a held folder takes the same lock
        with pytest.raises(UsageError, match='is in use by another run'):
            create_run_folder(str(tmp_path), 'exp', 'stamp', str(tmp_path / 'exp' / 'last.pth.tar'))
    finally:
        held.release()
    assert (tmp_path / 'exp' / LOCK_FILE).read_text() == ''  # a released lock names nobody
    # what a process killed while holding the lock leaves: its name in the file, but no flock (the kernel dropped it)
    (tmp_path / 'exp' / LOCK_FILE).write_text('pid 999999 on elsewhere, since 2026-01-01 00:00:00\n')
    again = create_run_folder(str(tmp_path), 'exp', 'stamp', '')
    assert f'pid {os.getpid()} ' in (tmp_path / 'exp' / LOCK_FILE).read_text()
    again.release()


def test_runs_started_together_under_the_timestamp_name_get_a_folder_each(tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    from timm_sadistill.training.run_folder import create_run_folder

    barrier = Barrier(6)

    def start(_):
        barrier.wait()  # as two commands started the same second: the same timm timestamp name
        return create_run_folder(str(tmp_path), '', '20260101-000000-test_resnet-32', '')

    with ThreadPoolExecutor(6) as pool:
        runs = list(pool.map(start, range(6)))
    names = sorted(Path(run.path).name for run in runs)
    assert names == ['20260101-000000-test_resnet-32'] + [f'20260101-000000-test_resnet-32-{k}' for k in range(1, 6)]
    for run in runs:
        run.release()
    assert list(tmp_path.iterdir()) == []  # folders in which nothing was written go with their lock


# ----------------------------------------------------------------------------------------------------------------
# Modes: every output honours the umask, as a plain open() does


@pytest.mark.parametrize('umask', [0o022, 0o077])
def test_every_output_has_the_mode_the_umask_gives(tmp_path, umask):
    import os
    import stat

    write_folder(tmp_path / 'data')
    before = os.umask(umask)
    try:
        assert main(['train', '--data-dir', str(tmp_path / 'data'), '--num-classes', '3', '--output', str(tmp_path / 'out'),
                     '--experiment', 'run'] + FLAGS) == 0
    finally:
        os.umask(before)
    paths = [tmp_path / 'out' / 'run'] + sorted((tmp_path / 'out' / 'run').rglob('*'))
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in paths}
    expected = {name: (0o777 if (tmp_path / name).is_dir() else 0o666) & ~umask for name in modes}
    assert modes == expected
    assert {'out/run/model/model.safetensors', 'out/run/model.safetensors', 'out/run/last.pth.tar'} <= set(modes)
