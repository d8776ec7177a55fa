"""The model folder a run exports (`timm_sadistill.model_folder`, `timm_sadistill.cli.export`): loadable by name
with timm, evaluated by a validate.py, used as a teacher; bad folders are one-line errors.

A teacher trained with ``--distill none`` and a student distilled from its folder (``--teacher local-dir:...``, no
``--teacher-checkpoint``, no ``--num-classes``) are module fixtures.
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_cli import COMMON_FLAGS, FIXTURES, NUM_CLASSES, STUDENT, TEACHER, check_ok, cli_env, read_summary, run_cli
from test_cli import workdir  # noqa: F401  (the generated ImageFolder, one per module)
from conftest import TIMM_VALIDATE_PY

# trained preprocessing that differs from every default, so the folder must carry it
PREPROCESSING = ['--mean', '0.4', '0.5', '0.6', '--std', '0.2', '0.25', '0.3', '--crop-pct', '0.8',
                 '--interpolation', 'bicubic']
_CLASSES_AT = COMMON_FLAGS.index('--num-classes')
FLAGS_WITHOUT_CLASSES = COMMON_FLAGS[:_CLASSES_AT] + COMMON_FLAGS[_CLASSES_AT + 2:]


@pytest.fixture(scope='module')
def teacher(workdir) -> Path:
    """A teacher run (--distill none, one epoch): its output folder."""
    check_ok(run_cli(['train', '--data-dir', 'data', '--model', TEACHER, '--distill', 'none', '--epochs', '1',
                      '--output', 'out', '--experiment', 'teacher'] + COMMON_FLAGS + PREPROCESSING, workdir))
    return workdir / 'out' / 'teacher'


@pytest.fixture(scope='module')
def student(workdir, teacher) -> Path:
    """An SA student, with EMA and the teacher-lead gate, distilled from the teacher's folder: no
    --teacher-checkpoint, no --num-classes."""
    check_ok(run_cli(['train', '--data-dir', 'data', '--model', STUDENT, '--distill', 'sa', '--teacher',
                      'local-dir:out/teacher/model', '--epochs', '2', '--model-ema', '--model-ema-decay', '0.9',
                      '--sa-beta', '5', '--sa-gate', 'while_ahead', '--output', 'out', '--experiment', 'student']
                     + FLAGS_WITHOUT_CLASSES + PREPROCESSING, workdir))
    return workdir / 'out' / 'student'


def best_row(run: Path) -> dict:
    """The summary.csv row of the best epoch by top-1 (the first of equals, as timm's saver ranks)."""
    rows = read_summary(run)
    return max(rows, key=lambda r: (float(r['eval_top1']), -int(r['epoch'])))


def test_folder_loads_by_name_with_the_trained_classes_preprocessing_and_weights(student):
    import timm
    from safetensors.torch import load_file

    model = timm.create_model(f'local-dir:{student / "model"}', pretrained=True)
    assert model.num_classes == NUM_CLASSES
    assert model.pretrained_cfg['label_names'] == [f'class{k}' for k in range(NUM_CLASSES)]
    data_config = timm.data.resolve_data_config({}, model=model)
    assert tuple(data_config['input_size']) == (3, 64, 64)
    assert tuple(data_config['mean']) == (0.4, 0.5, 0.6) and tuple(data_config['std']) == (0.2, 0.25, 0.3)
    assert data_config['crop_pct'] == 0.8 and data_config['interpolation'] == 'bicubic'
    # the weights are the ranked EMA student of the best epoch, as the run's own checkpoint holds it
    best = torch.load(student / 'model_best.pth.tar', map_location='cpu', weights_only=False)
    assert best['epoch'] == int(best_row(student)['epoch'])
    trained = best['state_dict_ema']
    loaded = model.state_dict()
    assert loaded.keys() == trained.keys()
    for name, value in trained.items():
        assert torch.equal(loaded[name], value), name
    legacy = load_file(str(student / 'model.safetensors'))  # kept for a release: the same weights
    assert all(torch.equal(legacy[name], value) for name, value in trained.items())


def test_model_card_has_the_hub_header_the_recipe_and_the_results(workdir, student, teacher):
    text = (student / 'model' / 'README.md').read_text()
    _, header, body = text.split('---\n', 2)
    header = yaml.safe_load(header)
    assert header['library_name'] == 'timm'
    assert {'timm', 'image-classification', 'knowledge-distillation', 'distill-sa'} <= set(header['tags'])
    metrics = {m['name']: m['value'] for m in header['model-index'][0]['results'][0]['metrics']}
    row = best_row(student)
    assert metrics['top-1 accuracy'] == pytest.approx(float(row['eval_top1']), abs=1e-3)
    assert metrics['top-5 accuracy'] == pytest.approx(float(row['eval_top5']), abs=1e-3)
    digest = hashlib.sha256((teacher / 'model' / 'model.safetensors').read_bytes()).hexdigest()
    assert digest in body and 'local-dir:out/teacher/model' in body
    for option in ('tau', 'alpha', 'beta', 'kd_weight', 'connector', 'cam_weight'):
        assert f'  - {option}: `' in body, option
    assert '  - beta: `5.0`' in body and '  - epochs: `2`' in body and '  - model_ema: `True`' in body
    # how often the teacher was right on the training batches of the exported epoch, as summary.csv has it
    assert f"- **Teacher top-1 on the training batches:** {float(row['train_teacher_top1']):.1f}% (epoch {row['epoch']}," in body
    # and what the gate decided on them: the share of batches it let the distillation term on
    gate = float(row['train_distill_gate'])
    assert 0 <= gate <= 1 and '  - gate: `while_ahead`' in body
    assert f"- **Distillation gate:** on for {100 * gate:.0f}% of the training batches of epoch {row['epoch']} (" \
        in body
    command = body.split('## Reproduce\n\n```bash\n', 1)[1].split('\n', 1)[0]
    assert command.startswith('timm-sadistill train ') and '--teacher local-dir:out/teacher/model' in command


def _validate(script: str, student: Path, workdir: Path, tmp_path: Path) -> dict:
    results = tmp_path / 'results.json'
    check_ok(subprocess.run(
        [sys.executable, script, '--model', f'local-dir:{student / "model"}', '--pretrained', '--data-dir',
         str(workdir / 'data'), '--device', 'cpu', '-j', '0', '-b', '8', '--results-file', str(results),
         '--results-format', 'json'], cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300))
    return json.loads(results.read_text())


def test_validate_py_reproduces_the_runs_validation_accuracy(workdir, student, tmp_path):
    results = _validate(str(FIXTURES / 'timm_validate_fixture.py'), student, workdir, tmp_path)
    assert results['num_classes'] == NUM_CLASSES and results['img_size'] == 64
    assert results['mean'] == [0.4, 0.5, 0.6] and results['std'] == [0.2, 0.25, 0.3]
    assert results['top1'] == pytest.approx(float(best_row(student)['eval_top1']), abs=1e-3)


@pytest.mark.skipif(not TIMM_VALIDATE_PY, reason='no ../shared/timm/ copy; set TSD_TIMM_VALIDATE_PY to a real timm validate.py')
def test_real_timm_validate_py_reproduces_the_runs_validation_accuracy(workdir, student, tmp_path):
    results = _validate(TIMM_VALIDATE_PY, student, workdir, tmp_path)
    assert results['img_size'] == 64 and results['crop_pct'] == 0.8 and results['interpolation'] == 'bicubic'
    assert results['top1'] == pytest.approx(float(best_row(student)['eval_top1']), abs=1e-3)


def test_folder_is_a_teacher_in_python_with_its_weights_and_normalisation(teacher):
    import timm
    import timm_sadistill as tsd
    from timm_sadistill import UsageError

    folder = f'local-dir:{teacher / "model"}'
    task = tsd.create_distill_task('kd', timm.create_model(STUDENT, num_classes=NUM_CLASSES), folder)
    trained = torch.load(teacher / 'model_best.pth.tar', map_location='cpu', weights_only=False)['state_dict']
    reference = timm.create_model(TEACHER, num_classes=NUM_CLASSES)
    reference.load_state_dict(trained)
    images = torch.randn(4, 3, 64, 64)
    torch.testing.assert_close(task.teacher.model(images), reference.eval()(images), rtol=0, atol=0)
    assert task.teacher.mean_kd.flatten().tolist() == pytest.approx([0.4, 0.5, 0.6])
    with pytest.raises(UsageError, match=f'has {NUM_CLASSES} classes and the student 5'):
        tsd.create_distill_task('kd', timm.create_model(STUDENT, num_classes=5), folder)
    with pytest.raises(UsageError, match='loads its weights from its folder'):
        tsd.create_distill_task('kd', timm.create_model(STUDENT, num_classes=NUM_CLASSES), folder,
                                teacher_pretrained_path=str(teacher / 'model.safetensors'))


def _break(folder: Path, problem: str, teacher: Path) -> None:
    """A copy of the teacher's folder with one thing wrong."""
    import shutil
    from safetensors.torch import save_file
    import timm

    shutil.copytree(teacher / 'model', folder)
    config = folder / 'config.json'
    if problem == 'no config':
        config.unlink()
    elif problem == 'no weights':
        (folder / 'model.safetensors').unlink()
    elif problem == 'unknown architecture':
        config.write_text(config.read_text().replace(f'"architecture": "{TEACHER}"', '"architecture": "resnet_nope"'))
    elif problem == 'weights of another model':
        save_file(timm.create_model(STUDENT, num_classes=NUM_CLASSES).state_dict(), str(folder / 'model.safetensors'))
    elif problem == 'truncated weights':
        weights = (folder / 'model.safetensors').read_bytes()
        (folder / 'model.safetensors').write_bytes(weights[:len(weights) // 2])
    elif problem == 'no folder':
        shutil.rmtree(folder)


BAD_FOLDERS = {
    'no folder': 'does not exist',
    'no config': 'has no config.json',
    'no weights': 'has no weights (model.safetensors)',
    'unknown architecture': "names architecture 'resnet_nope'",
    'truncated weights': 'cannot be read',
    'weights of another model': 'do not fit the architecture its config.json names',
}


@pytest.mark.parametrize('problem', list(BAD_FOLDERS))
def test_a_bad_teacher_folder_is_a_one_line_usage_error(problem, workdir, teacher, tmp_path):
    import timm
    import timm_sadistill as tsd
    from timm_sadistill import UsageError

    folder = tmp_path / 'model'
    _break(folder, problem, teacher)
    with pytest.raises(UsageError, match=BAD_FOLDERS[problem].replace('(', r'\(').replace(')', r'\)')):
        tsd.create_distill_task('sa', timm.create_model(STUDENT, num_classes=NUM_CLASSES), f'local-dir:{folder}')
    output = tmp_path / 'out'
    result = run_cli(['train', '--data-dir', 'data', '--model', STUDENT, '--distill', 'sa', '--teacher',
                      f'local-dir:{folder}', '--epochs', '1', '--output', str(output)] + COMMON_FLAGS, workdir)
    assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if 'error:' in line]
    assert len(errors) == 1 and BAD_FOLDERS[problem] in errors[0], result.stderr[-3000:]
    assert not output.exists()  # refused before anything was written


def test_a_timm_that_cannot_write_the_folder_still_gets_the_legacy_weights(tmp_path, monkeypatch):
    import argparse
    import timm
    from safetensors.torch import load_file
    from timm.task import ClassificationTask
    from timm_sadistill.training import export

    monkeypatch.setattr(export, 'MODEL_FOLDER_SUPPORTED', False)  # timm < 1.0.29
    model = timm.create_model(STUDENT, num_classes=NUM_CLASSES)
    args = argparse.Namespace(model=STUDENT, num_classes=NUM_CLASSES)
    export.export_student(ClassificationTask(model), args, str(tmp_path), epoch=0, data_config={})
    assert [p.name for p in tmp_path.iterdir()] == ['model.safetensors']
    saved = load_file(str(tmp_path / 'model.safetensors'))
    assert all(torch.equal(saved[name], value) for name, value in model.state_dict().items())


def test_a_teacher_folder_without_its_prefix_is_told_to_add_it(workdir, teacher, tmp_path):
    result = run_cli(['train', '--data-dir', 'data', '--model', STUDENT, '--distill', 'sa', '--teacher', 'out/teacher/model',
                      '--epochs', '1', '--output', str(tmp_path / 'out')] + COMMON_FLAGS, workdir)
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert '--teacher local-dir:out/teacher/model' in result.stderr


def _saved(folder: Path):
    """(weights' epoch, config.json's label names, the card's title) of a model folder: what must agree."""
    from safetensors import safe_open
    with safe_open(str(folder / 'model.safetensors'), framework='pt') as f:
        epoch = f.metadata()['epoch']
    labels = json.loads((folder / 'config.json').read_text())['label_names']
    title = next(line for line in (folder / 'README.md').read_text().splitlines() if line.startswith('# '))
    return epoch, labels, title


@pytest.mark.parametrize('kill_at', ['writing the card', 'between the renames'])
def test_a_model_folder_killed_while_replaced_is_the_old_one_whole_after_the_cleanup(tmp_path, monkeypatch, kill_at):
    import timm
    from timm_sadistill import _atomic, model_folder
    from timm_sadistill.model_folder import ModelCard, check_model_folder, save_model_folder

    model = timm.create_model(STUDENT, num_classes=NUM_CLASSES)
    folder = tmp_path / 'model'

    def save(epoch: int) -> None:
        save_model_folder(model, str(folder), label_names=[f'e{epoch}c{k}' for k in range(NUM_CLASSES)],
                          card=ModelCard(name=f'epoch {epoch}', description='.'), metadata={'epoch': str(epoch)})

    save(0)
    old = _saved(folder)
    assert old == ('0', ['e0c0', 'e0c1', 'e0c2'], '# epoch 0')
    if kill_at == 'writing the card':
        monkeypatch.setattr(model_folder, 'render_model_card', lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    else:
        renames = []

        def rename(src, dst):  # the old folder moves aside, then the process dies
            if renames:
                raise KeyboardInterrupt()
            renames.append(src)
            os.rename(src, dst)

        monkeypatch.setattr(_atomic.os, 'rename', rename)
    with pytest.raises(KeyboardInterrupt):
        save(1)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) != ['model']  # the kill left its traces
    _atomic.remove_partial_writes(str(tmp_path))  # what the next run in the folder does first
    assert sorted(p.name for p in tmp_path.iterdir()) == ['model']
    assert _saved(folder) == old
    check_model_folder(str(folder))
    save(1)
    assert _saved(folder) == ('1', ['e1c0', 'e1c1', 'e1c2'], '# epoch 1')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['model']


def test_a_folder_with_other_files_is_not_replaced(tmp_path):
    import timm
    from timm_sadistill.errors import UsageError
    from timm_sadistill.model_folder import save_model_folder

    (tmp_path / 'notes.txt').write_text('mine')
    with pytest.raises(UsageError, match=r"holds other files than a model folder's \(notes.txt\)"):
        save_model_folder(timm.create_model(STUDENT, num_classes=NUM_CLASSES), str(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ['notes.txt']
