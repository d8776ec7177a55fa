"""Model names, classes and cheap checks: a model folder (``local-dir:``) or cached Hub repo (``hf-hub:``) is taken
wherever a model name is; teacher and data that disagree on the classes are refused before any model is built; every
flag mistake is one line before the models, the data or the teacher's validation pass cost anything."""
import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import timm_sadistill as tsd
import timm_sadistill.training.run as run_module
from timm_sadistill.cli import main
from timm_sadistill.cli._common import run_command
from timm_sadistill.features import resolve_img_size

from test_user_errors import FLAGS, STUDENT, digests, run, run_main, write_folder  # noqa: F401


@pytest.fixture(scope='module')
def model_folder(run) -> Path:
    """The 3-class model folder (label names c0, c1, c2) of the finished run."""
    return run / 'out' / 'done' / 'model'


def _copy_with_labels(folder: Path, target: Path, label_names) -> Path:
    """A copy of a model folder whose config.json lists ``label_names`` (None: none)."""
    shutil.copytree(folder, target)
    config = json.loads((target / 'config.json').read_text())
    config.pop('label_names', None)
    if label_names is not None:
        config['label_names'] = label_names
    (target / 'config.json').write_text(json.dumps(config))
    return target


def _must_not_run(name):
    def fail(*args, **kwargs):
        raise AssertionError(f'{name} ran before the check')
    return fail


def test_flag_mistakes_are_one_line_before_the_data_is_read(run, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(run_module, 'create_datasets', _must_not_run('create_datasets'))
    before = digests(run / 'out')
    done = run / 'out' / 'done'
    common = ['train', '--data-dir', str(run / 'data'), '--output', str(run / 'out'), '--experiment', 'x'] + FLAGS
    teacher = ['--distill', 'kd', '--teacher', 'resnet18']
    cases = {
        'reads image folders and tars only': [['--dataset', name] for name in
                                              ('hfds/beans', 'wds/shards', 'tfds/mnist', 'torch/cifar10')],
        "--opt adamz: timm has no optimizer 'adamz'": [['--opt', 'adamz']],
        "--sched cosinez: Unknown scheduler 'cosinez'": [['--sched', 'cosinez']],
        '--aa rnd-m9: not an augmentation policy timm knows': [['--aa', 'rnd-m9']],
        'the batch size is a positive number': [['-b', '0'], ['-b', '-4']],
        '--lr -1.0: a learning rate is 0 or more': [['--lr', '-1']],
        '--clip-grad -1.0: the clip bound is a positive number': [['--clip-grad', '-1']],
        'holds model weights, not a training checkpoint': [['--resume', str(done / 'model' / 'model.safetensors')]],
        "--pretrained: the pretrained weights of 'test_resnet'": [['--pretrained']],
        "--teacher-pretrained: the pretrained weights of 'resnet18'": [teacher + ['--teacher-pretrained']],
        'nothing is downloaded (HF_HUB_OFFLINE is set)': [['--model', 'hf-hub:timm/resnet18.a1_in1k'],
                                                          ['--distill', 'kd', '--teacher', 'hf-hub:timm/nope']],
        '--device mps: no mps device is available': [['--device', 'mps']],
        "--class-map 'no_such_map.txt' does not exist": [['--class-map', 'no_such_map.txt']],
        '--torchcompile nope: torch has no such compile backend': [['--torchcompile', 'nope']],
        '--save-attention-maps draws SA': [['--save-attention-maps']],
        "Unknown model 'no_such_net' (--model)": [['--model', 'no_such_net']],
        f"--teacher '{done}' is a folder; name it as timm does: --teacher local-dir:{done}": [['--distill', 'kd', '--teacher',
                                                                                    str(done)]],
    }
    if torch.backends.mps.is_available():
        cases.pop('--device mps: no mps device is available')
    for expected, variants in cases.items():
        for flags in variants:
            line = run_main(common + flags, capsys)
            assert line.startswith('timm-sadistill train: error: ') and expected in line, (expected, line)
    assert digests(run / 'out') == before


def test_model_mistakes_are_one_line_before_the_teacher(run, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(run_module, '_create_task', _must_not_run('the teacher'))
    save_file(timm.create_model('resnet18', num_classes=3).state_dict(), str(tmp_path / 'r18.safetensors'))
    common = ['train', '--data-dir', str(run / 'data'), '--output', str(run / 'out'), '--experiment', 'x'] + FLAGS
    cases = {
        "-b 1: BatchNorm 'layer4.0.bn1' of ResNet sees a 1x1 map at 32x32": ['-b', '1'],
        f"--initial-checkpoint '{tmp_path / 'r18.safetensors'}' does not fit --model test_resnet with 3 classes":
            ['--initial-checkpoint', str(tmp_path / 'r18.safetensors')],
        "--img-size 40x40 is not a multiple of the student vit_tiny_patch16_224's patch size 16x16":
            ['--model', 'vit_tiny_patch16_224', '--img-size', '40'],
        '--in-chans 1: the mean of test_resnet has 3 entries': ['--in-chans', '1'],
    }
    for expected, flags in cases.items():
        line = run_main(common + flags, capsys)
        assert expected in line, (expected, line)


def test_teacher_and_data_of_other_classes_are_refused_before_any_model(run, model_folder, capsys, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setattr(run_module, '_create_student', _must_not_run('the student'))
    four = write_folder(tmp_path / 'four', classes=4)
    renamed = write_folder(tmp_path / 'renamed', classes=3)
    for split in ('train', 'validation'):
        for k in range(3):
            (renamed / split / f'c{k}').rename(renamed / split / f'x{k}')
    kd = ['--distill', 'kd', '--teacher']
    cases = {
        # names both counts, with or without --num-classes
        f"--teacher local-dir:{model_folder} has 3 classes and the data '{four / 'train'}' 4 class folders":
            [[*kd, f'local-dir:{model_folder}', '--data-dir', str(four)],
             [*kd, f'local-dir:{model_folder}', '--data-dir', str(four), '--num-classes', '4']],
        # --num-classes alone disagrees: it is named, with the count that fits
        f"--num-classes 5 disagrees with --teacher local-dir:{model_folder}, which has 3 classes as the data "
        f"'{run / 'data' / 'train'}' has; drop --num-classes or pass --num-classes 3.":
            [[*kd, f'local-dir:{model_folder}', '--data-dir', str(run / 'data'), '--num-classes', '5']],
        f"--teacher local-dir:{model_folder} knows other classes than the class folders of '{renamed / 'train'}'":
            [[*kd, f'local-dir:{model_folder}', '--data-dir', str(renamed)]],
        # a fine-tuned model folder keeps its head, so its classes are checked as well
        f"--model local-dir:{model_folder} knows other classes":
            [['--model', f'local-dir:{model_folder}', '--data-dir', str(renamed)]],
    }
    for expected, variants in cases.items():
        for flags in variants:
            line = run_main(['train', '--output', str(tmp_path / 'out')] + FLAGS + flags, capsys)
            assert expected in line, (expected, line)
    assert not (tmp_path / 'out').exists()


@pytest.mark.slow
def test_a_teacher_without_label_names_trains_saying_so_and_the_head_has_the_class_folders(run, model_folder,
                                                                                            caplog, tmp_path):
    """Without --num-classes the head has the data's 3 class folders (not timm's 1000), and the model folder names
    them; a teacher folder without label names trains, with one line saying its classes could not be checked."""
    unnamed = _copy_with_labels(model_folder, tmp_path / 'unnamed', None)
    caplog.set_level('INFO')
    assert main(['train', '--data-dir', str(run / 'data'), '--output', str(tmp_path / 'out'), '--experiment', 'kd',
                 '--distill', 'kd', '--teacher', f'local-dir:{unnamed}', '--val-split', ''] + FLAGS) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert f"--num-classes 3: the class folders of '{run / 'data' / 'train'}' (c0, c1, c2)." in messages
    assert sum('could not be checked' in m for m in messages) == 1
    config = json.loads((tmp_path / 'out' / 'kd' / 'model' / 'config.json').read_text())
    assert config['num_classes'] == 3 and config['label_names'] == ['c0', 'c1', 'c2']
    card = (tmp_path / 'out' / 'kd' / 'model' / 'README.md').read_text()
    assert 'the best by training loss, without validation)' in card and 'best by top1' not in card


@pytest.mark.slow
def test_train_fine_tunes_a_model_folder_with_its_weights(run, model_folder, tmp_path):
    assert main(['train', '--data-dir', str(run / 'data'), '--output', str(tmp_path / 'out'), '--experiment', 'ft',
                 ] + FLAGS + ['--model', f'local-dir:{model_folder}', '--lr', '1e-9']) == 0
    before, after = load_file(model_folder / 'model.safetensors'), load_file(tmp_path / 'out' / 'ft' / 'model' /
                                                                            'model.safetensors')
    assert after['fc.weight'].shape == (3, before['fc.weight'].shape[1])  # the folder's 3 classes, not 1000
    from safetensors import safe_open
    with safe_open(str(tmp_path / 'out' / 'ft' / 'model' / 'model.safetensors'), 'pt') as f:
        assert f.metadata()['arch'] == STUDENT
    for key in ('conv1.0.weight', 'fc.weight'):  # at lr 1e-9 the weights are those loaded, not a fresh init
        torch.testing.assert_close(after[key], before[key], atol=1e-6, rtol=0)


def test_stages_and_viz_take_model_folders(model_folder, capsys, tmp_path):
    name = f'local-dir:{model_folder}'
    assert main(['stages', name, '--teacher', name, '--img-size', '64']) == 0
    assert 'layer3 (192)  layer3 (192)' in capsys.readouterr().out
    image = tmp_path / 'img.png'
    from PIL import Image
    Image.new('RGB', (32, 32)).save(image)
    # no --num-classes: the teacher folder's 3 classes
    assert main(['viz', '--model', STUDENT, '--teacher', name, '--img-size', '32', str(image),
                 '-o', str(tmp_path / 'maps.png')]) == 0
    assert (tmp_path / 'maps.png').is_file()
    line = run_main(['viz', '--model', STUDENT, '--teacher', name, '--img-size', '32', str(image),
                     '-o', str(tmp_path / 'maps.jpg')], capsys)
    assert "-o/--output '" in line and "names a .jpg file, but the picture is a PNG" in line
    assert not (tmp_path / 'maps.jpg').exists()
    line = run_main(['stages', 'hf-hub:timm/resnet18.a1_in1k'], capsys)
    assert "MODEL 'hf-hub:timm/resnet18.a1_in1k' is not in the local Hugging Face cache; nothing is downloaded" in line


def test_a_cached_hub_repo_is_a_model_folder(model_folder, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants
    repo = tmp_path / 'hub' / 'models--someone--tiny'
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text('abc123')
    shutil.copytree(model_folder, repo / 'snapshots' / 'abc123')
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'hub'))
    source = tsd.model_folder.resolve_model_name('hf-hub:someone/tiny')
    assert source.architecture == STUDENT and source.num_classes == 3 and source.label_names == ['c0', 'c1', 'c2']
    assert main(['stages', 'hf-hub:someone/tiny', '--img-size', '64']) == 0
    assert 'Stages of hf-hub:someone/tiny at 64x64 (its own weights)' in capsys.readouterr().out
    # a teacher from the cache brings its weights (loaded from the snapshot: timm never asks the Hub)
    student = timm.create_model(STUDENT, num_classes=3)
    task = tsd.create_distill_task('kd', student, 'hf-hub:someone/tiny', img_size=32, verbose=False)
    weights = load_file(model_folder / 'model.safetensors')
    assert torch.equal(task.teacher.model.state_dict()['conv1.0.weight'], weights['conv1.0.weight'])


def test_one_module_as_teacher_and_student_is_refused():
    model = timm.create_model(STUDENT, num_classes=3)
    with pytest.raises(tsd.UsageError, match='The teacher is the student itself'):
        tsd.create_distill_task('sa', model, model, img_size=32, verbose=False)
    assert all(p.requires_grad for p in model.parameters()) and model.training


def test_list_stages_and_img_size_refuse_what_they_would_misread():
    with pytest.raises(tsd.UsageError, match=r"list_stages takes a model, not a str; pass timm.create_model\('resnet18'\)"):
        tsd.list_stages('resnet18')
    from timm_sadistill.features import resolve_img_size
    assert resolve_img_size(64) == (64, 64) and resolve_img_size((3, 48, 64)) == (48, 64)
    for bad in ('64', 64.0, (0, 64), [True, 2]):
        with pytest.raises(tsd.UsageError, match='img_size'):
            resolve_img_size(bad)


@pytest.mark.parametrize('xcit_role', ['student', 'teacher'])
def test_xcit_pairs_with_a_cnn_both_ways(xcit_role):
    """XCiT keeps its patch size as an int (a ViT as a pair)."""
    torch.manual_seed(0)
    xcit = timm.create_model('xcit_nano_12_p16_224', num_classes=4, img_size=64)
    cnn = timm.create_model(STUDENT if xcit_role == 'teacher' else 'resnet18', num_classes=4)
    student, teacher = (xcit, cnn) if xcit_role == 'student' else (cnn, xcit)
    task = tsd.create_distill_task('sa', student, teacher, img_size=64, verbose=False)
    names = [s.name for s in task.student_stages], [t.name for t in task.teacher_stages]
    assert names == ((['blocks.11'], ['layer3']) if xcit_role == 'student' else (['layer3'], ['blocks.11']))
    out = task(torch.randn(2, 3, 64, 64), torch.tensor([0, 1]))
    out['loss'].backward()
    assert torch.isfinite(out['loss'])


def test_stages_measures_maps_of_stages_that_share_a_module(capsys):
    """CoaT's last three stages are all 'parallel_blocks': each row has its own measured map."""
    assert main(['stages', 'coat_tiny', '--img-size', '64']) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith('parallel_blocks')]
    assert [(row[1], row[4]) for row in rows] == [('1', '8x8'), ('2', '4x4'), ('3', '2x2')]


def test_command_line_errors_name_the_flags_not_the_parameters(capsys):
    """An error carries the options it names; the command line words each with its flag, and code quoted in the
    message stays as it is."""
    def on_the_command_line(error: tsd.UsageError) -> str:
        def body():
            raise error
        assert run_command('prog', body) == 2
        return capsys.readouterr().err.strip().removeprefix('prog: error: ')

    both = tsd.UsageError('{option} and {option.temperature} must be positive, got {option:-1.0}, '
                          '{option.temperature:4.0}.', option='tau', loss='sa')
    assert str(both) == 'tau and temperature must be positive, got tau=-1.0, temperature=4.0.'
    assert on_the_command_line(both) == \
        '--sa-tau and --kd-temperature must be positive, got --sa-tau -1.0, --kd-temperature 4.0.'
    stages = tsd.UsageError('pass a larger {option}, or explicit {option.student_stages} and {option.teacher_stages}.',
                            option='img_size')
    assert on_the_command_line(stages) == 'pass a larger --img-size, or explicit --distill-stages and --teacher-stages.'
    code = tsd.UsageError('build it: timm.create_model(name, img_size=64), then {option:3}.', option='num_classes')
    assert str(code) == 'build it: timm.create_model(name, img_size=64), then num_classes=3.'
    assert on_the_command_line(code) == 'build it: timm.create_model(name, img_size=64), then --num-classes 3.'
    with pytest.raises(tsd.UsageError) as refused:  # the library's own errors carry their options
        resolve_img_size(0)
    assert on_the_command_line(refused.value).startswith('--img-size 0x0: an input size is a positive number')


@pytest.mark.parametrize('key, value, expected', [
    ('label_names', [0, 1, 2], "key 'label_names' must be a list of strings (one class name each), got [0, 1, 2]"),
    ('label_names', ['c0', None, 'c2'], "key 'label_names' must be a list of strings"),
    ('label_names', 'c0', "key 'label_names' must be a list of strings (one class name each), got c0"),
    ('label_names', ['c0', 'c1'], "key 'label_names' has 2 names, but 'num_classes' is 3"),
    ('num_classes', '3', "key 'num_classes' must be a count of classes, got '3'"),
    ('num_classes', True, "key 'num_classes' must be a count of classes, got True"),
    ('pretrained_cfg', [], "key 'pretrained_cfg' must be an object, got list"),
    ('input_size', [3, 0, 32], "key 'pretrained_cfg.input_size' must be [channels, height, width] of positive integers"),
    ('nesting', None, "cannot be read (RecursionError"),
])
def test_a_model_folder_config_of_the_wrong_types_is_one_line_naming_the_file_and_key(
        run, model_folder, capsys, tmp_path, key, value, expected):
    folder = _copy_with_labels(model_folder, tmp_path / 'folder', ['c0', 'c1', 'c2'])
    config = json.loads((folder / 'config.json').read_text())
    if key == 'input_size':
        config['pretrained_cfg']['input_size'] = value
    elif key != 'nesting':
        config[key] = value
    text = json.dumps(config) if key != 'nesting' else '[' * 100000 + ']' * 100000
    (folder / 'config.json').write_text(text)
    for argv in (['train', '--data-dir', str(run / 'data'), '--output', str(tmp_path / 'out')] + FLAGS +
                 ['--distill', 'kd', '--teacher', f'local-dir:{folder}'],
                 ['train', '--data-dir', str(run / 'data'), '--output', str(tmp_path / 'out')] + FLAGS +
                 ['--model', f'local-dir:{folder}']):
        line = run_main(argv, capsys)
        assert f"'{folder / 'config.json'}'" in line and expected in line, line
    assert not (tmp_path / 'out').exists()
