"""Run folders: a resumed run has each epoch once in summary.csv (with its header, also in a new --experiment), and no
partial temp file of a killed save survives a restart."""
import csv
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from timm_sadistill.cli import main
from test_cli import cli_env
from test_user_errors import FLAGS, STUDENT, write_folder



def epochs(folder: Path) -> list:
    with open(folder / 'summary.csv', newline='') as f:
        return [row['epoch'] for row in csv.DictReader(f)]


def train_command(tmp_path: Path) -> list:
    """`timm-sadistill train` of one epoch on a folder of 3 classes, into ``<tmp_path>/out/run``, as a subprocess argv."""
    write_folder(tmp_path / 'data')
    return [sys.executable, '-m', 'timm_sadistill', 'train', '--data-dir', str(tmp_path / 'data'), '--num-classes', '3',
            '--output', str(tmp_path / 'out'), '--experiment', 'run'] + FLAGS


def paused_in_a_save(argv: list, folder: Path) -> subprocess.Popen:
    """The run ``argv`` started, once it pauses in a checkpoint save (timm's temp file written, before its rename)."""
    # a shell runs a background job (`make test &`, a CI script) with SIGINT ignored, and a child inherits that, so a
    # Ctrl-C would be lost: the run starts with the default disposition, as from a terminal
    process = subprocess.Popen(argv, env=cli_env(TSD_TEST_PAUSE_IN_SAVE='120'), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while not (folder / 'tmp.pth.tar').exists():
        assert process.poll() is None and time.monotonic() < deadline, 'no checkpoint save started'
        time.sleep(0.1)
    return process


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


def test_a_run_without_experiment_gets_timms_timestamp_name_numbered_when_taken():
    from datetime import datetime

    from timm_sadistill.training.run_name import run_folder_name, timestamp_name

    name = timestamp_name('local-dir:runs/teacher/model', 224, datetime(2026, 12, 1, 21, 3, 11))
    assert name == '20261201-210311-runs_teacher_model-224'  # timm train.py's <date>-<time>-<model>-<size>
    assert [run_folder_name(name, k) for k in range(3)] == [name, f'{name}-1', f'{name}-2']


# ----------------------------------------------------------------------------------------------------------------
# Modes: every output honours the umask, as a plain open() does


@pytest.mark.parametrize('umask', [0o022, 0o077])
def test_every_output_has_the_mode_the_umask_gives(tmp_path, umask):
    import os
    import stat

    write_folder(tmp_path / 'data')
    before = os.umask(umask)
    try:
        assert main(['train', '--data-dir', str(tmp_path / 'data'), '--num-classes', '3',
                     '--output', str(tmp_path / 'out'), '--experiment', 'run'] + FLAGS) == 0
    finally:
        os.umask(before)
    paths = [tmp_path / 'out' / 'run'] + sorted((tmp_path / 'out' / 'run').rglob('*'))
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in paths}
    expected = {name: (0o777 if (tmp_path / name).is_dir() else 0o666) & ~umask for name in modes}
    assert modes == expected
    assert {'out/run/model/model.safetensors', 'out/run/model.safetensors', 'out/run/last.pth.tar'} <= set(modes)


# ----------------------------------------------------------------------------------------------------------------
# After a crash: restart, resume, a finished run, a stale export, a full disk, Ctrl-C


def run_main(argv: list, capsys, status: int = 2) -> list:
    """``timm-sadistill argv`` in-process, asserted to exit with ``status``; its stderr lines."""
    assert main(argv) == status, capsys.readouterr().err[-3000:]
    err = capsys.readouterr().err
    assert 'Traceback' not in err
    return [line for line in err.splitlines() if line.strip()]


@pytest.fixture(scope='module')
def finished(tmp_path_factory) -> Path:
    """A finished 2-epoch run in out/done: copy it before changing it."""
    root = tmp_path_factory.mktemp('finished')
    write_folder(root / 'data')
    assert main(['train', '--data-dir', str(root / 'data'), '--num-classes', '3', '--output', str(root / 'out'),
                 '--experiment', 'done'] + FLAGS + ['--epochs', '2']) == 0
    logging.root.handlers.clear()
    return root


def _copy(finished: Path, tmp_path: Path) -> tuple:
    """(command that trains the copy of the finished run in tmp_path/done, its folder)."""
    import shutil
    shutil.copytree(finished / 'out' / 'done', tmp_path / 'done')
    command = ['train', '--data-dir', str(finished / 'data'), '--num-classes', '3', '--output', str(tmp_path),
               '--experiment', 'done'] + FLAGS
    return command, tmp_path / 'done'


def _digests(folder: Path) -> dict:
    import hashlib
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob('*')) if p.is_file()}


def _export_epoch(folder: Path) -> str:
    from safetensors import safe_open
    with safe_open(str(folder / 'model' / 'model.safetensors'), framework='pt') as f:
        return f.metadata()['epoch']


@pytest.mark.parametrize('epochs, words', [
    ('2', "has trained all 2 epochs: nothing to train (pass a larger --epochs to train on)."),
    ('1', "has trained 2 epochs, more than the 1 this command asks for: nothing to train (pass a larger --epochs to "
            "train on)."),
])
def test_resuming_a_finished_run_says_so_and_trains_nothing(finished, tmp_path, capsys, epochs, words):
    command, folder = _copy(finished, tmp_path)
    before = _digests(folder)
    lines = run_main(command + ['--epochs', epochs, '--resume', str(folder / 'last.pth.tar')], capsys, status=0)
    assert [line for line in lines if 'nothing to train' in line] == [lines[-1]]
    assert lines[-1].endswith(f"--resume '{folder / 'last.pth.tar'}' {words}")
    assert _digests(folder) == before  # not even args.yaml


def test_resuming_refreshes_a_stale_export_with_the_best_checkpoint(finished, tmp_path, capsys):
    import timm
    import torch
    from safetensors.torch import load_file
    from timm_sadistill.model_folder import save_model_folder

    command, folder = _copy(finished, tmp_path)
    best = torch.load(folder / 'model_best.pth.tar', map_location='cpu', weights_only=False)
    # what a kill between saving the best checkpoint and exporting it leaves: the export of another epoch
    save_model_folder(timm.create_model(STUDENT, num_classes=3), str(folder / 'model'), metadata={'epoch': '7'})
    (folder / 'model.safetensors').unlink()
    run_main(command + ['--epochs', '2', '--resume', str(folder / 'last.pth.tar')], capsys, status=0)
    assert _export_epoch(folder) == str(best['epoch'])
    for path in (folder / 'model' / 'model.safetensors', folder / 'model.safetensors'):
        weights = load_file(str(path))
        assert weights.keys() == best['state_dict'].keys()
        assert all(torch.equal(weights[k], v) for k, v in best['state_dict'].items()), path
    card = (folder / 'model' / 'README.md').read_text()
    assert f"**Exported epoch:** {best['epoch']} " in card and '## Results' in card
    from test_user_errors import digests
    again = digests(folder)
    run_main(command + ['--epochs', '2', '--resume', str(folder / 'last.pth.tar')], capsys, status=0)
    assert digests(folder) == again  # a current export is left alone


def test_a_run_stopped_before_its_first_checkpoint_restarts_with_the_same_command(finished, tmp_path, capsys):
    command, folder = _copy(finished, tmp_path)
    # what Ctrl-C, kill -9 or a full disk during the first save leaves
    for name in ('last.pth.tar', 'model_best.pth.tar', 'checkpoint-0.pth.tar', 'checkpoint-1.pth.tar',
                 'model.safetensors'):
        (folder / name).unlink(missing_ok=True)
    import shutil
    shutil.rmtree(folder / 'model')
    (folder / 'tmp.pth.tar').write_bytes(b'x' * 1000)
    assert sorted(p.name for p in folder.iterdir()) == ['.lock', 'args.yaml', 'summary.csv', 'tmp.pth.tar']
    line = run_main(command + ['--resume', str(folder / 'last.pth.tar')], capsys)[-1]
    assert line.endswith(f"--resume '{folder / 'last.pth.tar'}' does not exist: the run in '{folder}' stopped before "
                         "its first checkpoint; drop --resume (and pass --experiment done) to start it over there.")
    run_main(command, capsys, status=0)
    assert epochs(folder) == ['0'] and (folder / 'last.pth.tar').is_file() and not (folder / 'tmp.pth.tar').exists()


def _safetensors_disk_full(tensors, path, metadata=None):
    Path(path).write_bytes(b'partial')
    from safetensors import SafetensorError
    raise SafetensorError(f'Error while serializing: I/O error: No space left on device (os error 28) at path "{path}"')


def _config_disk_full(model, path, **kwargs):
    import errno
    Path(path).write_bytes(b'partial')
    raise OSError(errno.ENOSPC, 'No space left on device')


@pytest.mark.parametrize('target, writer, words', [
    ('timm_sadistill._atomic.save_file', _safetensors_disk_full,
     "No space left on the device of '{folder}' while writing weights (Error while serializing: I/O error: No space "
     "left on device (os error 28)"),
    ('timm_sadistill.model_folder.save_config_for_hf', _config_disk_full,
     "No space left on the device of '{folder}' while saving (No space left on device)"),
], ids=['SafetensorError', 'OSError'])
def test_a_full_disk_while_exporting_is_one_line_and_the_resume_refreshes_the_export(
        finished, tmp_path, capsys, monkeypatch, target, writer, words):
    command, folder = _copy(finished, tmp_path)
    (folder / 'model.safetensors').unlink()  # a stale export: the run exports again
    before = _digests(folder / 'model')
    monkeypatch.setattr(target, writer)
    resume = command + ['--resume', str(folder / 'last.pth.tar')]
    line = run_main(resume + ['--epochs', '3'], capsys)[-1]
    assert line.startswith('timm-sadistill train: error: ' + words.format(folder=folder))
    assert line.endswith(f"the files saved before are intact: free space, then continue with --resume "
                         f"{folder / 'last.pth.tar'}.")
    assert _digests(folder / 'model') == before  # the model folder is the previous one, whole
    assert not [p.name for p in folder.rglob('*') if '.tmp' in p.name or p.name.endswith(('.new', '.old'))]
    monkeypatch.undo()
    run_main(resume + ['--epochs', '3'], capsys, status=0)
    import torch
    best = torch.load(folder / 'model_best.pth.tar', map_location='cpu', weights_only=False)['epoch']
    assert epochs(folder) == ['0', '1', '2'] and _export_epoch(folder) == str(best)


@pytest.mark.parametrize('checkpointed', [False, True], ids=['before the first checkpoint', 'after it'])
def test_ctrl_c_is_one_line_with_how_to_go_on(finished, tmp_path, capsys, monkeypatch, checkpointed):
    from timm_sadistill.training import loop

    command, folder = _copy(finished, tmp_path)
    if checkpointed:
        command = command + ['--epochs', '3', '--resume', str(folder / 'last.pth.tar')]
    else:
        command = [flag if flag != 'done' else 'fresh' for flag in command]
        folder = tmp_path / 'fresh'

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt()

    monkeypatch.setattr(loop, 'train_one_epoch', interrupted)
    lines = run_main(command, capsys, status=130)
    hint = f"continue with --resume {folder / 'last.pth.tar'}." if checkpointed else \
        'rerun the same command (nothing was checkpointed yet, so it starts over).'
    assert lines[-1] == f"timm-sadistill train: interrupted: '{folder}': {hint}"


@pytest.mark.slow
def test_a_busy_folder_refuses_a_second_run_and_a_kill_or_ctrl_c_leaves_a_folder_that_goes_on(tmp_path):
    import re
    import socket

    command = train_command(tmp_path)
    folder = tmp_path / 'out' / 'run'

    def last_line(result: subprocess.CompletedProcess, status: int) -> str:
        assert result.returncode == status and 'Traceback' not in result.stderr, result.stderr[-3000:]
        return result.stderr.strip().splitlines()[-1]

    first = paused_in_a_save(command, folder)
    try:  # the same command again while the first runs: refused, nothing of the first touched
        second = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=300)
    finally:  # then the first dies in its first save
        first.kill()
        first.wait()
    assert re.fullmatch(rf"timm-sadistill train: error: '{re.escape(str(folder))}' is in use by another run \(pid "
                        rf"{first.pid} on {re.escape(socket.gethostname())}, since [-0-9: ]+\); wait for it to end, or "
                        r"pass another --experiment\.", last_line(second, 2))
    assert sorted(p.name for p in folder.iterdir()) == ['.lock', 'args.yaml', 'summary.csv', 'tmp.pth.tar']
    assert f'pid {first.pid} ' in (folder / '.lock').read_text()  # the dead holder: named, blocking nothing
    last_line(subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=300), 0)
    assert epochs(folder) == ['0'] and (folder / 'last.pth.tar').is_file()

    resumed = paused_in_a_save(command + ['--epochs', '2', '--resume', str(folder / 'last.pth.tar')], folder)
    resumed.send_signal(signal.SIGINT)  # Ctrl-C after the first checkpoint, while saving the second
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 130 and 'Traceback' not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == (f"timm-sadistill train: interrupted: '{folder}': continue with --resume "
                                            f"{folder / 'last.pth.tar'}.")
    assert not (folder / 'tmp.pth.tar').exists()


def test_a_file_system_without_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    from timm_sadistill.training.run_folder import create_run_folder

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, 'No locks available')

    monkeypatch.setattr(fcntl, 'flock', no_locks)
    with caplog.at_level('WARNING'):
        run = create_run_folder(str(tmp_path), 'exp', 'stamp', '')
    run.release()
    assert f"The file system of '{tmp_path / 'exp'}' cannot lock files (No locks available)" in caplog.text


@pytest.mark.slow
def test_sigterm_is_handled_as_ctrl_c_a_resumable_folder_the_resume_command_and_exit_143(tmp_path):
    """What SLURM, Kubernetes and torchrun send before a kill: the save it lands in is undone, the folder resumes."""
    command = train_command(tmp_path)
    folder = tmp_path / 'out' / 'run'
    assert subprocess.run(command, env=cli_env(), capture_output=True, timeout=300).returncode == 0
    resumed = paused_in_a_save(command + ['--epochs', '3', '--resume', str(folder / 'last.pth.tar')], folder)
    resumed.send_signal(signal.SIGTERM)
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 143 and 'Traceback' not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == (f"timm-sadistill train: terminated (SIGTERM): '{folder}': continue with "
                                            f"--resume {folder / 'last.pth.tar'}.")
    assert not (folder / 'tmp.pth.tar').exists() and epochs(folder) == ['0', '1']
    result = subprocess.run(command + ['--epochs', '3', '--resume', str(folder / 'last.pth.tar')], env=cli_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert epochs(folder) == ['0', '1', '2']


# ----------------------------------------------------------------------------------------------------------------
# Symlinks in the run folder are replaced, never written through; the run folder stays under --output


def _link_elsewhere(folder: Path, elsewhere: Path, names: tuple) -> dict:
    """Move ``names`` of ``folder`` to ``elsewhere`` and leave symlinks to them in their place; the moved files'
    digests (what must never change)."""
    elsewhere.mkdir()
    for name in names:
        (folder / name).rename(elsewhere / name)
        (folder / name).symlink_to(elsewhere / name)
    return _digests(elsewhere)


def test_a_resume_replaces_symlinked_files_and_never_writes_through_them(finished, tmp_path, capsys):
    command, folder = _copy(finished, tmp_path)
    elsewhere = tmp_path / 'elsewhere'
    (folder / '.lock').write_text('a file the lock must not truncate\n')
    before = _link_elsewhere(folder, elsewhere, ('summary.csv', 'args.yaml', 'last.pth.tar', '.lock'))
    (folder / 'tmp.pth.tar').symlink_to(elsewhere / 'planted')  # timm's temp checkpoint name, dangling
    lines = run_main(command + ['--epochs', '3', '--resume', str(folder / 'last.pth.tar')], capsys, status=0)
    assert _digests(elsewhere) == before  # nothing written through a link, nothing created at one
    assert epochs(folder) == ['0', '1', '2']  # the rows read through the link, then its own file
    for name in ('summary.csv', 'args.yaml', 'last.pth.tar', '.lock'):
        assert not (folder / name).is_symlink() and (folder / name).is_file(), name
        assert any(f"'{folder / name}' is a symbolic link to '{elsewhere / name}'" in line for line in lines), name
    assert not (folder / 'tmp.pth.tar').exists()


def test_a_symlinked_model_folder_is_replaced_and_the_folder_goes_on_resuming(finished, tmp_path, capsys):
    command, folder = _copy(finished, tmp_path)
    elsewhere = tmp_path / 'elsewhere'
    (folder / 'model' / 'notes.txt').write_text('the user keeps more than a model folder here\n')
    before = _link_elsewhere(folder, elsewhere, ('model',))
    (folder / 'model.safetensors').unlink()  # a stale export: the resume exports again, replacing model/
    for epochs_now in ('3', '4'):  # a symlinked model/ used to wedge every later resume (rmtree of a link)
        run_main(command + ['--epochs', epochs_now, '--resume', str(folder / 'last.pth.tar')], capsys, status=0)
        assert _digests(elsewhere) == before  # the link went, not what it points to
        assert not (folder / 'model').is_symlink() and (folder / 'model' / 'config.json').is_file()
        assert not [p.name for p in folder.iterdir() if p.name.endswith(('.new', '.old'))]
    assert epochs(folder) == ['0', '1', '2', '3']


def test_a_crash_while_a_symlinked_model_folder_was_aside_is_undone_without_touching_its_target(tmp_path):
    import os

    from timm_sadistill._atomic import remove_partial_writes

    target = tmp_path / 'elsewhere'
    target.mkdir()
    (target / 'model.safetensors').write_bytes(b'weights')
    (target / '.weights.tmp').write_bytes(b'the user\'s, not a partial write of the run')
    run = tmp_path / 'run'
    run.mkdir()
    (run / '.model.old').symlink_to(target)  # a kill between replace_folder's two renames
    (run / '.model.new').mkdir()
    remove_partial_writes(str(run))
    assert (run / 'model').is_symlink() and not (run / '.model.new').exists()
    (run / '.model.old').symlink_to(target)  # the same, after the new folder was swapped in
    remove_partial_writes(str(run))
    assert not os.path.lexists(run / '.model.old')
    assert sorted(p.name for p in target.iterdir()) == ['.weights.tmp', 'model.safetensors']


@pytest.mark.parametrize('experiment, words', [
    ('../x', "--experiment '../x' climbs out of --output with '..'"),
    ('ablation/../../x', "--experiment 'ablation/../../x' climbs out of --output with '..'"),
    ('{tmp_path}/abs', "--experiment '{tmp_path}/abs' is an absolute path"),
    ('.', "--experiment '.' names --output itself"),
])
def test_an_experiment_outside_output_is_refused_before_anything_is_written(tmp_path, capsys, experiment, words):
    write_folder(tmp_path / 'data')
    experiment = experiment.format(tmp_path=tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    lines = run_main(['train', '--data-dir', str(tmp_path / 'data'), '--num-classes', '3', '--output',
                      str(tmp_path / 'out'), '--experiment', experiment] + FLAGS, capsys)
    assert lines[-1] == (f"timm-sadistill train: error: {words.format(tmp_path=tmp_path)}: a run folder is "
                         "<output>/<experiment>; pass a name under --output (e.g. ablation/run1), and pick the place "
                         "with --output.")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no --output, no folder beside it


def test_a_nested_experiment_creates_locks_exports_and_resumes(tmp_path, capsys):
    write_folder(tmp_path / 'data')
    command = ['train', '--data-dir', str(tmp_path / 'data'), '--num-classes', '3', '--output', str(tmp_path / 'out'),
               '--experiment', 'ablation/run1'] + FLAGS
    folder = tmp_path / 'out' / 'ablation' / 'run1'
    run_main(command, capsys, status=0)
    assert {'.lock', 'args.yaml', 'summary.csv', 'last.pth.tar', 'model'} <= {p.name for p in folder.iterdir()}
    assert (folder / 'model' / 'config.json').is_file() and (folder / '.lock').read_text() == ''
    line = run_main(command, capsys)[-1]  # the same name again: the hint names this folder's checkpoint
    assert line.endswith(f"continue it with --resume {folder / 'last.pth.tar'}, or pass another --experiment.")
    run_main(command + ['--epochs', '2', '--resume', str(folder / 'last.pth.tar')], capsys, status=0)
    assert epochs(folder) == ['0', '1'] and _export_epoch(folder) in ('0', '1')
    for name in ('last.pth.tar', 'model_best.pth.tar', 'checkpoint-0.pth.tar', 'checkpoint-1.pth.tar'):
        (folder / name).unlink()
    line = run_main(command + ['--resume', str(folder / 'last.pth.tar')], capsys)[-1]  # its rerun names it whole
    assert line.endswith("drop --resume (and pass --experiment ablation/run1) to start it over there.")


def test_a_nested_experiment_refused_during_setup_leaves_no_folder(tmp_path):
    from timm_sadistill.training.run_folder import create_run_folder

    (tmp_path / 'out').mkdir()
    create_run_folder(str(tmp_path / 'out'), 'ablation/run1', 'stamp', '').release()
    assert list((tmp_path / 'out').iterdir()) == []  # the folders it made for the name go with it
