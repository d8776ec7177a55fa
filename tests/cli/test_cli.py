"""Command line tests: real `python -m timm_sadistill ...` subprocesses on a generated ImageFolder.

The teacher run and the SA student run are module fixtures shared by the tests that read their output folders.
"""
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import TIMM_TRAIN_PY

pytestmark = pytest.mark.slow  # every test here runs the CLI in a subprocess (make test-fast leaves them out)

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parents[1] / 'fixtures'
NUM_CLASSES = 3
TEACHER = 'resnet18'
STUDENT = 'test_resnet'
# small, fast and deterministic enough: no label smoothing, no warmup, no loader workers
COMMON_FLAGS = [
    '--num-classes', str(NUM_CLASSES), '--img-size', '64', '-b', '8', '--workers', '0',
    '--lr', '0.05', '--warmup-epochs', '0', '--smoothing', '0', '--log-interval', '1',
]


def cli_env(**extra: str) -> Dict[str, str]:
    """This checkout first on the path; offline; Triton kernels interpreted on the CPU."""
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join([str(REPO_ROOT)] + ([env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
    env.update(HF_HUB_OFFLINE='1', TRITON_INTERPRET='1', OMP_NUM_THREADS='2', **extra)
    return env


def run_cli(args: List[str], cwd: Path, env: Optional[Dict[str, str]] = None, timeout: float = 300):
    return subprocess.run(
        [sys.executable, '-m', 'timm_sadistill'] + args, cwd=cwd, env=env or cli_env(),
        capture_output=True, text=True, timeout=timeout,
    )


def check_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f'exit {result.returncode}\nstderr:\n{result.stderr[-4000:]}'


def read_summary(folder: Path) -> List[Dict[str, str]]:
    with open(folder / 'summary.csv') as f:
        return list(csv.DictReader(f))


def write_image_folder(root: Path, per_class: int = 12, val_per_class: int = 4) -> Path:
    """train/ and validation/ with one folder per class; class k is the image whose channel k is bright."""
    rng = np.random.default_rng(0)
    for split, count in (('train', per_class), ('validation', val_per_class)):
        for k in range(NUM_CLASSES):
            folder = root / split / f'class{k}'
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 80, (64, 64, 3), dtype=np.uint8)
                pixels[:, :, k] += 150
                Image.fromarray(pixels).save(folder / f'{i}.png')
    return root


@pytest.fixture(scope='module')
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('cli')
    write_image_folder(root / 'data')
    return root


@pytest.fixture(scope='module')
def teacher_run(workdir) -> Path:
    """A teacher trained with the same tool (--distill none), one flag set by a -c YAML: its output folder."""
    (workdir / 'teacher.yaml').write_text('hflip: 0.25\nepochs: 1\n')
    result = run_cli(['train', '-c', 'teacher.yaml', '--data-dir', 'data', '--model', TEACHER, '--distill', 'none',
                      '--output', 'out', '--experiment', 'teacher'] + COMMON_FLAGS, workdir)
    check_ok(result)
    return workdir / 'out' / 'teacher'


@pytest.fixture(scope='module')
def student_run(workdir, teacher_run):
    """An SA student distilled from the teacher run's model.safetensors, with EMA: (folder, stderr)."""
    result = run_cli(['train', '--data-dir', 'data', '--model', STUDENT, '--distill', 'sa', '--teacher', TEACHER,
                      '--teacher-checkpoint', str(teacher_run / 'model.safetensors'), '--epochs', '2',
                      '--model-ema', '--model-ema-decay', '0.9', '--output', 'out', '--experiment', 'student',
                      '--save-attention-maps'] + COMMON_FLAGS, workdir)
    check_ok(result)
    return workdir / 'out' / 'student', result.stderr


def test_teacher_run_writes_timm_output_folder(teacher_run):
    import timm
    from timm.task import ClassificationTask, resume_task_checkpoint

    for name in ('args.yaml', 'summary.csv', 'last.pth.tar', 'model_best.pth.tar', 'model.safetensors'):
        assert (teacher_run / name).is_file(), name
    import yaml

    assert yaml.safe_load((teacher_run / 'args.yaml').read_text())['hflip'] == 0.25  # from the -c config file
    rows = read_summary(teacher_run)
    assert [r['epoch'] for r in rows] == ['0']
    assert {'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr'} <= set(rows[0])
    checkpoint = torch.load(teacher_run / 'last.pth.tar', map_location='cpu', weights_only=False)
    assert {'epoch', 'arch', 'state_dict', 'optimizer', 'version'} <= set(checkpoint)
    assert checkpoint['arch'] == TEACHER
    task = ClassificationTask(timm.create_model(TEACHER, num_classes=NUM_CLASSES))
    assert resume_task_checkpoint(task, str(teacher_run / 'model_best.pth.tar'), weights_only=False) == 1


def test_sa_student_logs_teacher_accuracy_and_every_loss_term(student_run):
    folder, stderr = student_run
    assert f'Teacher {TEACHER} top-1' in stderr
    rows = read_summary(folder)
    assert [r['epoch'] for r in rows] == ['0', '1']
    for column in ('train_loss', 'train_task_loss', 'train_kd_loss', 'train_sa_dist', 'train_sa_att', 'train_sa_kd',
                   'train_teacher_top1',
                   'eval_top1', 'lr'):
        assert column in rows[0], column
    checkpoint = torch.load(folder / 'last.pth.tar', map_location='cpu', weights_only=False)
    assert 'distill_loss' in checkpoint['task_state']  # the connectors travel with the checkpoint
    assert 'state_dict_ema' in checkpoint and 'task_state_ema' in checkpoint
    assert not any(k.startswith(('student_taps', 'distill_loss')) for k in checkpoint['state_dict'])
    from PIL import Image
    with Image.open(folder / 'attention_maps.png') as picture:  # --save-attention-maps
        assert picture.width > picture.height > 0


def test_exported_student_loads_with_timm_and_as_a_teacher_checkpoint(student_run):
    import timm
    import timm_sadistill as tsd

    folder, _ = student_run
    path = str(folder / 'model.safetensors')
    model = timm.create_model(STUDENT, pretrained=True, num_classes=NUM_CLASSES,
                              pretrained_cfg_overlay=dict(file=path, num_classes=NUM_CLASSES))
    # the export is the student the run ranked best: its EMA weights in model_best.pth.tar
    trained = torch.load(folder / 'model_best.pth.tar', map_location='cpu', weights_only=False)['state_dict_ema']
    assert model.state_dict().keys() == trained.keys()
    for name, value in trained.items():
        assert torch.equal(model.state_dict()[name], value), name
    reference = timm.create_model(STUDENT, num_classes=NUM_CLASSES)
    reference.load_state_dict(trained)
    task = tsd.create_distill_task('kd', timm.create_model(TEACHER, num_classes=NUM_CLASSES), STUDENT,
                                   teacher_pretrained_path=path)
    images = torch.randn(4, 3, 64, 64)
    torch.testing.assert_close(task.teacher.model(images), reference.eval()(images), rtol=0, atol=0)


def _batches_tracked(state: Dict[str, torch.Tensor]) -> List[int]:
    """The ``num_batches_tracked`` of every BatchNorm in ``state``: how many training steps each has seen."""
    return [int(v) for k, v in state.items() if k.endswith('num_batches_tracked')]


def test_resume_restores_state_and_continues_the_epoch_count(workdir, teacher_run, student_run):
    folder, _ = student_run
    saved = torch.load(folder / 'last.pth.tar', map_location='cpu', weights_only=False)
    assert saved['epoch'] == 1
    steps_per_epoch = _batches_tracked(saved['state_dict'])[0] // 2
    result = run_cli(['train', '--data-dir', 'data', '--model', STUDENT, '--distill', 'sa', '--teacher', TEACHER,
                      '--teacher-checkpoint', str(teacher_run / 'model.safetensors'), '--epochs', '3',
                      '--model-ema', '--model-ema-decay', '0.9', '--output', 'out', '--experiment', 'student',
                      '--resume', str(folder / 'last.pth.tar')] + COMMON_FLAGS, workdir)
    check_ok(result)
    assert 'Restoring optimizer state' in result.stderr and 'Loaded state_dict_ema' in result.stderr
    rows = read_summary(folder)
    assert [r['epoch'] for r in rows] == ['0', '1', '2']
    checkpoint = torch.load(folder / 'last.pth.tar', map_location='cpu', weights_only=False)
    assert checkpoint['epoch'] == 2
    # student and connectors went on from their saved state: their BatchNorms have counted all three epochs' steps
    connectors = _batches_tracked(checkpoint['task_state']['distill_loss'])
    assert connectors and set(connectors) == set(_batches_tracked(checkpoint['state_dict'])) == {3 * steps_per_epoch}
    # the schedule was replayed to epoch 2: cosine from --lr 0.05 over 3 epochs (min lr 0, no warmup)
    assert float(rows[2]['lr']) == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * 2 / 3)))


def test_a_run_killed_while_saving_leaves_the_previous_checkpoint_readable(workdir, teacher_run, tmp_path):
    import shutil

    output = tmp_path / 'out'
    shutil.copytree(teacher_run, output / 'teacher')
    before = torch.load(output / 'teacher' / 'last.pth.tar', map_location='cpu', weights_only=False)
    process = subprocess.Popen(
        [sys.executable, '-m', 'timm_sadistill', 'train', '--data-dir', str(workdir / 'data'), '--model', TEACHER,
         '--epochs', '2', '--output', str(output), '--experiment', 'teacher',
         '--resume', str(output / 'teacher' / 'last.pth.tar')] + COMMON_FLAGS,
        env=cli_env(TSD_TEST_PAUSE_IN_SAVE='120'), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not (output / 'teacher' / 'tmp.pth.tar').exists():  # timm's temp name; we pause before its rename
            assert process.poll() is None and time.monotonic() < deadline, 'no checkpoint save started'
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    after = torch.load(output / 'teacher' / 'last.pth.tar', map_location='cpu', weights_only=False)
    assert after['epoch'] == before['epoch'] == 0
    torch.load(output / 'teacher' / 'model_best.pth.tar', map_location='cpu', weights_only=False)


def test_torchrun_two_cpu_ranks_agree_and_only_rank0_writes(workdir, teacher_run, tmp_path):
    from safetensors.torch import load_file

    output, dump, writes = tmp_path / 'out', tmp_path / 'dump', tmp_path / 'writes'
    writes.mkdir()
    result = subprocess.run(  # each rank records the files it writes (tests/fixtures/record_writes.py)
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
         str(FIXTURES / 'record_writes.py'), str(writes),
         'train', '--data-dir', str(workdir / 'data'), '--model', STUDENT, '--distill', 'sa', '--teacher', TEACHER,
         '--teacher-checkpoint', str(teacher_run / 'model.safetensors'), '--epochs', '1', '-b', '4',
         '--output', str(output), '--experiment', 'ddp'] + COMMON_FLAGS,
        cwd=tmp_path, env=cli_env(TSD_TEST_DUMP_PARAMS=str(dump)), capture_output=True, text=True, timeout=300,
    )
    check_ok(result)
    rank0, rank1 = load_file(str(dump / 'rank0.safetensors')), load_file(str(dump / 'rank1.safetensors'))
    assert rank0.keys() == rank1.keys() and rank0
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    assert [p.name for p in output.iterdir()] == ['ddp']
    files = ['.lock', 'args.yaml', 'checkpoint-0.pth.tar', 'last.pth.tar', 'model', 'model.safetensors',
             'model_best.pth.tar', 'summary.csv']
    assert sorted(p.name for p in (output / 'ddp').iterdir()) == files
    assert sorted(p.name for p in (output / 'ddp' / 'model').iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    assert 'torchrun --nproc_per_node=2' in (output / 'ddp' / 'model' / 'README.md').read_text()
    written = {}  # rank -> every path under the output folder it created, wrote, renamed or removed
    for rank in (0, 1):
        paths = {Path(line.split('\t')[1]) for line in (writes / f'rank{rank}.log').read_text().splitlines()}
        written[rank] = {path for path in paths if path.is_relative_to(output)}
    assert written[1] == set(), f'rank 1 wrote {sorted(map(str, written[1]))}'
    assert {output / 'ddp' / name for name in files} <= written[0]


def test_non_finite_loss_stops_with_the_terms_or_is_skipped_on_request(workdir, teacher_run):
    # beta 1e39 overflows float32: the attention-map term is infinite from the first step
    flags = ['train', '--data-dir', 'data', '--model', STUDENT, '--distill', 'sa', '--teacher', TEACHER,
             '--teacher-checkpoint', str(teacher_run / 'model.safetensors'), '--epochs', '1', '--sa-beta', '1e39',
             '--output', 'out'] + COMMON_FLAGS
    stopped = run_cli(flags + ['--experiment', 'nonfinite'], workdir)
    assert stopped.returncode == 2 and 'Traceback' not in stopped.stderr
    assert 'Non-finite loss' in stopped.stderr and 'sa_att' in stopped.stderr
    # every step skipped: nothing trained, so nothing is saved or exported (no card for an untrained model)
    skipped = run_cli(flags + ['--experiment', 'skipped', '--skip-nonfinite'], workdir)
    assert skipped.returncode == 2 and 'Traceback' not in skipped.stderr, skipped.stderr[-3000:]
    assert 'Skipping step' in skipped.stderr
    assert skipped.stderr.strip().splitlines()[-1].startswith(
        'timm-sadistill train: error: --skip-nonfinite skipped every step of epoch 0 (the loss was NaN/inf at all ')
    assert sorted(p.name for p in (workdir / 'out' / 'skipped').iterdir()) == ['.lock', 'args.yaml']


BAD_INPUTS = {
    'unknown model': (['--model', 'no_such_model'], "Unknown model 'no_such_model'"),
    'unknown distill': (['--distill', 'no_such_method', '--teacher', TEACHER], "invalid choice: 'no_such_method'"),
    'unknown stage': (['--distill', 'sa', '--teacher', TEACHER, '--teacher-checkpoint', '{teacher}',
                       '--distill-stages', 'layer9'], "Unknown stage 'layer9'"),
    # the checkpoint's classifier is read before any model is built
    'teacher class count': (['--distill', 'sa', '--teacher', TEACHER, '--teacher-checkpoint', '{wrong_classes}'],
                            f"--teacher {TEACHER} has {NUM_CLASSES + 2} classes and the data 'data/train' "
                            f"{NUM_CLASSES} class folders; distil on data of the teacher's classes"),
    'missing data dir': (['--data-dir', 'no_such_dir'], "Data folder 'no_such_dir' does not exist"),
    'undecodable image': (['--data-dir', '{broken_data}'], 'Cannot decode image'),
    'teacher without weights': (['--distill', 'sa', '--teacher', TEACHER], '--teacher-checkpoint'),
    'attention maps of another method': (['--distill', 'at', '--teacher', TEACHER, '--teacher-checkpoint', '{teacher}',
                                          '--save-attention-maps'], 'use it with --distill sa'),
}


@pytest.mark.parametrize('case', list(BAD_INPUTS))
def test_bad_input_exits_2_with_a_message_and_no_traceback(case, workdir, teacher_run, tmp_path):
    import timm
    from safetensors.torch import save_file

    flags, expected = BAD_INPUTS[case]
    wrong_classes = tmp_path / 'teacher5.safetensors'
    if case == 'teacher class count':
        save_file(timm.create_model(TEACHER, num_classes=NUM_CLASSES + 2).state_dict(), str(wrong_classes))
    broken_data = tmp_path / 'broken'
    if case == 'undecodable image':
        write_image_folder(broken_data, per_class=3, val_per_class=1)  # 9 images: one batch
        (broken_data / 'train' / 'class0' / 'broken.png').write_bytes(b'this is not a png')
    paths = dict(teacher=teacher_run / 'model.safetensors', wrong_classes=wrong_classes, broken_data=broken_data)
    flags = [flag.format(**paths) for flag in flags]
    args = ['train', '--data-dir', 'data', '--model', STUDENT, '--epochs', '1', '--output', str(tmp_path / 'out')]
    result = run_cli(args + COMMON_FLAGS + flags, workdir)
    assert result.returncode == 2, result.stderr[-2000:]
    assert 'Traceback' not in result.stderr
    lines = result.stderr.strip().splitlines()  # logging first, then one error line, last
    assert [line for line in lines if ': error: ' in line] == [lines[-1]], result.stderr[-2000:]
    assert lines[-1].startswith('timm-sadistill train: error: ') and expected in lines[-1]


def test_timm_train_runs_a_train_py_with_our_task(workdir, teacher_run):
    result_json = workdir / 'fixture_result.json'
    result = run_cli(['timm-train', str(FIXTURES / 'timm_train_fixture.py'), '--model', STUDENT, '--img-size', '64',
                      '--kd-model-name', TEACHER, '--kd-loss-weight', '0.5', '--result-json', str(result_json),
                      '--teacher-checkpoint', str(teacher_run / 'model.safetensors'), '--distill', 'sa',
                      '--sa-beta', '5'], workdir)
    check_ok(result)
    reported = json.loads(result_json.read_text())
    assert reported['task'] == 'DistillTask'  # one task class for every loss
    assert {'sa_dist', 'sa_att', 'kd_loss', 'task_loss', 'loss'} <= set(reported['result_keys'])
    assert reported['distill_loss_weight'] == 0.5  # train.py's own flag reached its task construction


def test_timm_train_refuses_a_script_that_is_not_timms_train_py(workdir, tmp_path):
    script = tmp_path / 'other.py'
    script.write_text('print("hello")\n')
    result = run_cli(['timm-train', str(script), '--kd-model-name', TEACHER, '--distill', 'sa'], workdir)
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert "does not look like timm's train.py" in result.stderr


@pytest.mark.skipif(not TIMM_TRAIN_PY, reason='no ../shared/timm/ copy; set TSD_TIMM_TRAIN_PY to a real timm train.py')
def test_timm_train_runs_the_real_timm_train_py(workdir, teacher_run, tmp_path):
    result = run_cli(['timm-train', TIMM_TRAIN_PY, '--data-dir', str(workdir / 'data'),
                      '--model', STUDENT, '--epochs', '1', '--device', 'cpu', '--output', str(tmp_path),
                      '--experiment', 'real', '--kd-model-name', TEACHER, '--distill', 'sa',
                      '--teacher-checkpoint', str(teacher_run / 'model.safetensors')] + COMMON_FLAGS, workdir)
    check_ok(result)
    checkpoint = torch.load(tmp_path / 'real' / 'last.pth.tar', map_location='cpu', weights_only=False)
    assert 'distill_loss' in checkpoint['task_state']  # only our task carries connector state


# ----------------------------------------------------------------------------------------------------------------
# Robustness: kills, corrupted files, bad data folders, determinism


def _file_digests(folder: Path) -> Dict[str, str]:
    import hashlib
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_run_killed_during_an_epoch_resumes_from_the_last_complete_checkpoint(workdir, tmp_path):
    output = tmp_path / 'out'
    flags = ['train', '--data-dir', str(workdir / 'data'), '--model', STUDENT, '--epochs', '3', '--output', str(output),
             '--experiment', 'killed'] + COMMON_FLAGS
    process = subprocess.Popen([sys.executable, '-m', 'timm_sadistill'] + flags, env=cli_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = output / 'killed'
    try:
        deadline = time.monotonic() + 240
        # epoch 0 is saved: the run is now inside epoch 1
        while not ((folder / 'last.pth.tar').exists() and (folder / 'model_best.pth.tar').exists()):
            assert process.poll() is None and time.monotonic() < deadline, 'epoch 0 never finished'
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    best_before = torch.load(folder / 'model_best.pth.tar', map_location='cpu', weights_only=False)
    result = run_cli(flags + ['--resume', str(folder / 'last.pth.tar')], tmp_path)
    check_ok(result)
    assert [r['epoch'] for r in read_summary(folder)] == ['0', '1', '2']
    assert torch.load(folder / 'last.pth.tar', map_location='cpu', weights_only=False)['epoch'] == 2
    assert best_before['epoch'] in (0, 1)
    torch.load(folder / 'model_best.pth.tar', map_location='cpu', weights_only=False)


def test_corrupted_checkpoints_are_clear_errors_and_nothing_is_overwritten(workdir, teacher_run, tmp_path):
    import shutil

    import timm
    from safetensors.torch import save_file

    folder = tmp_path / 'out' / 'teacher'
    shutil.copytree(teacher_run, folder)
    data = (folder / 'last.pth.tar').read_bytes()
    (folder / 'last.pth.tar').write_bytes(data[:len(data) // 2])
    before = _file_digests(folder)
    resume = run_cli(['train', '--data-dir', str(workdir / 'data'), '--model', TEACHER, '--epochs', '2',
                      '--output', str(tmp_path / 'out'), '--experiment', 'teacher',
                      '--resume', str(folder / 'last.pth.tar')] + COMMON_FLAGS, tmp_path)
    assert resume.returncode == 2 and 'Traceback' not in resume.stderr
    assert 'cannot be read: it is truncated or not a checkpoint' in resume.stderr
    assert _file_digests(folder) == before

    weights = (teacher_run / 'model.safetensors').read_bytes()
    (tmp_path / 'truncated.safetensors').write_bytes(weights[:len(weights) // 3])
    save_file(timm.create_model(STUDENT, num_classes=NUM_CLASSES).state_dict(), str(tmp_path / 'other_arch.safetensors'))
    for checkpoint, expected in (('truncated.safetensors', 'cannot be read'), ('other_arch.safetensors', 'does not fit')):
        result = run_cli(['train', '--data-dir', str(workdir / 'data'), '--model', STUDENT, '--distill', 'sa',
                          '--teacher', TEACHER, '--teacher-checkpoint', str(tmp_path / checkpoint), '--epochs', '1',
                          '--output', str(tmp_path / 'out'), '--experiment', 'student'] + COMMON_FLAGS, tmp_path)
        assert result.returncode == 2 and expected in result.stderr and 'Traceback' not in result.stderr, result.stderr
    assert not (tmp_path / 'out' / 'student').exists()


def test_same_seed_gives_the_same_losses(workdir, teacher_run, tmp_path):
    runs = []
    for name in ('a', 'b'):
        result = run_cli(['train', '--data-dir', str(workdir / 'data'), '--model', STUDENT, '--distill', 'sa',
                          '--teacher', TEACHER, '--teacher-checkpoint', str(teacher_run / 'model.safetensors'),
                          '--epochs', '2', '--seed', '7', '--output', str(tmp_path), '--experiment', name] + COMMON_FLAGS,
                         tmp_path)
        check_ok(result)
        runs.append([{k: v for k, v in row.items() if k != 'lr'} for row in read_summary(tmp_path / name)])
    assert runs[0] == runs[1] and len(runs[0]) == 2


@pytest.mark.slow
def test_sigterm_to_torchrun_reaches_every_rank_each_exits_143_with_one_line(workdir, teacher_run, tmp_path):
    """torchrun forwards the SIGTERM a cluster sends to every rank: each cleans up and says how to go on."""
    output = tmp_path / 'out'
    process = subprocess.Popen(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '--tee', '3',
         '--log-dir', str(tmp_path / 'logs'), '-m', 'timm_sadistill',
         'train', '--data-dir', str(workdir / 'data'), '--model', STUDENT, '--epochs', '3', '-b', '4',
         '--output', str(output), '--experiment', 'ddp'] + COMMON_FLAGS,
        cwd=tmp_path, env=cli_env(TSD_TEST_PAUSE_IN_SAVE='120'), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    deadline = time.monotonic() + 240
    while not (output / 'ddp' / 'tmp.pth.tar').exists():  # rank 0 pauses in its first save; rank 1 waits for it
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()[-3000:]
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
    ranks = [line for line in out.splitlines() if line.startswith('[default')]  # --tee: '[default<rank>]:<line>'
    assert not [line for line in ranks if 'Traceback' in line], out[-3000:]  # torchrun's own agent raises one
    ends = [line for line in ranks if 'timm-sadistill train: terminated (SIGTERM)' in line]
    assert sorted(line[:len('[default0]')] for line in ends) == ['[default0]', '[default1]'], out[-3000:]
    assert any(f"'{output / 'ddp'}': rerun the same command" in line for line in ends), ends
    assert not (output / 'ddp' / 'tmp.pth.tar').exists()
