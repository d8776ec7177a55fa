"""A teacher whose classes include the data's (a 1000-class ImageNet model on folders named by synsets, a model folder
whose label_names include the class folders) is distilled on the data's classes: its logits restricted to them in the
data's order for every term, its printed top-1 measured so, the mapping recorded; a teacher of other classes is
refused, naming the classes it does not know. Offline: random 1000-class weights stand in for pretrained ones."""
import logging
import re
import shutil
from argparse import Namespace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from safetensors.torch import save_file

import timm_sadistill as tsd
from timm_sadistill.cli import main
from timm_sadistill.model_folder import ModelName, resolve_model_name, save_model_folder
from timm_sadistill.tasks.teacher_classes import teacher_num_classes
from timm_sadistill.training.run_checks import check_classes

from test_user_errors import FLAGS, run_main  # noqa: F401

# ImageNet-1k classes 0 (tench), 217 (English springer) and 491 (chain saw)
SYNSETS = ['n01440764', 'n02102040', 'n03000684']
INDICES = [0, 217, 491]


def _teacher(num_classes: int = 1000, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model('test_resnet', num_classes=num_classes).eval()


def _sliced(teacher: torch.nn.Module, indices) -> torch.nn.Module:
    """A copy of ``teacher`` with a head of only the rows ``indices``: a teacher trained on those classes alone."""
    sliced = timm.create_model('test_resnet', num_classes=len(indices)).eval()
    state = teacher.state_dict()
    state['fc.weight'], state['fc.bias'] = state['fc.weight'][indices], state['fc.bias'][indices]
    sliced.load_state_dict(state)
    return sliced


def test_the_teachers_logits_are_restricted_to_the_students_classes_in_its_order():
    teacher, student = _teacher(), timm.create_model('test_resnet', num_classes=3)
    # by synset, by description (case and '_' aside) and by index: one mapping
    names = ['n03000684', 'english_springer', 'Tench']
    task = tsd.create_distill_task('kd', student, teacher, teacher_classes=names, img_size=32, verbose=False)
    assert task.teacher_classes == [491, 217, 0]
    assert tsd.create_distill_task('kd', student, teacher, teacher_classes=[491, 217, 0], img_size=32,
                                   verbose=False).teacher_classes == [491, 217, 0]
    seen = []
    task.distill_loss.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[3]))
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    out = task(x, y)
    with torch.no_grad():
        expected = teacher(task.teacher_input(x))[:, [491, 217, 0]]
    torch.testing.assert_close(seen[0], expected)
    temperature = task.distill_loss.temperature
    p_t = F.softmax(expected / temperature, dim=-1)
    kl = (p_t * (p_t.log() - F.log_softmax(out['output'].detach() / temperature, dim=-1))).sum(-1).mean()
    torch.testing.assert_close(out['kd'].detach(), kl * temperature ** 2)


@pytest.mark.parametrize('loss', ['kd', 'dkd', 'dist', 'sa'])
def test_every_term_reads_the_teacher_as_if_trained_on_the_students_classes(loss):
    """The 1000-class teacher restricted to 3 classes gives every term (SA's CAM term, which runs the teacher's
    head, included) exactly what a teacher whose head has only those 3 rows gives."""
    teacher, student = _teacher(), timm.create_model('test_resnet', num_classes=3)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    outs = []
    for kwargs in ({'teacher_model': teacher, 'teacher_classes': SYNSETS},
                   {'teacher_model': _sliced(teacher, INDICES)}):
        torch.manual_seed(1)  # the same connectors
        task = tsd.create_distill_task(loss, student, img_size=32, verbose=False, **kwargs)
        outs.append({k: v.detach() for k, v in task(x, y).items()})
    assert loss != 'sa' or 'sa_cam' in outs[0]
    assert outs[0].keys() == outs[1].keys()
    for key in outs[0]:
        torch.testing.assert_close(outs[0][key], outs[1][key], msg=key)


def test_teacher_classes_it_does_not_know_are_refused_naming_them():
    teacher, student = _teacher(), timm.create_model('test_resnet', num_classes=3)
    cases = {
        'teacher_classes names classes the teacher does not know (c1, c2; its classes are the imagenet-1k synsets':
            ['n01440764', 'c1', 'c2'],
        "Class name 'crane' (n02012849 or n03126707) describes more than one imagenet-1k class; name such classes "
        "by their synset": ['n01440764', 'crane', 'n03000684'],
        "Classes 'n01440764' and 'tench' are both the teacher's class 0": ['n01440764', 'tench', 'n03000684'],
        "teacher_classes holds 1000, outside 0..999 of the teacher's 1000 classes": [0, 1, 1000],
        "teacher_classes holds the teacher's class 1 twice": [0, 1, 1],
        "teacher_classes lists 2 teacher classes for the student's 3": [0, 1],
        'all indices into the teacher\'s logits or all class names': [0, 'n01440764', 2],
    }
    for expected, classes in cases.items():
        with pytest.raises(tsd.UsageError, match=re.escape(expected)):
            tsd.create_distill_task('kd', student, teacher, teacher_classes=classes, img_size=32, verbose=False)
    with pytest.raises(tsd.UsageError, match=re.escape('has 3 classes and the teacher 1000; build both with the same '
                                                       'num_classes, or pass teacher_classes')):
        tsd.create_distill_task('kd', student, teacher, img_size=32, verbose=False)


def _write_data(root: Path, classes, val_counts) -> Path:
    rng = np.random.default_rng(0)
    for split, counts in (('train', [2] * len(classes)), ('validation', val_counts)):
        for name, count in zip(classes, counts):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / split / name / f'{i}.png')
    return root


def _teacher_top1(checkpoint: Path, data: Path, order, indices) -> float:
    """The teacher's top-1 on the validation images over its logits of ``indices``, computed apart from the run: its
    own normalisation, the student's eval transform otherwise (as the loader feeds it, renormalised)."""
    teacher = timm.create_model('resnet18', num_classes=1000, pretrained=True,
                                pretrained_cfg_overlay={'file': str(checkpoint)}).eval()
    cfg = teacher.pretrained_cfg
    transform = timm.data.create_transform(input_size=(3, 32, 32), interpolation='bilinear', crop_pct=0.95,
                                           mean=cfg['mean'], std=cfg['std'])
    right = total = 0
    for label, name in enumerate(order):
        for path in sorted((data / 'validation' / name).iterdir()):
            with torch.no_grad():
                logits = teacher(transform(Image.open(path).convert('RGB'))[None])
            right += int(logits[0, indices].argmax()) == label
            total += 1
    return 100.0 * right / total


def test_train_distils_a_1000_class_teacher_on_folders_named_by_synsets(tmp_path, caplog):
    """The Done-means command, at test size: resnet18 weights of 1000 classes, three synset folders in the order of
    a --class-map. The head's bias makes class 999 every image's top class, and the English springer (217) the top
    of the three: the top-1 over the restricted logits is the springer's 3 of 5 images (60%), over all, 0%."""
    order = ['n03000684', 'n01440764', 'n02102040']  # the --class-map: not the synsets' sorted order
    data = _write_data(tmp_path / 'data', SYNSETS, val_counts=[1, 3, 1])
    (tmp_path / 'classes.txt').write_text('\n'.join(order) + '\n')
    torch.manual_seed(0)
    weights = timm.create_model('resnet18', num_classes=1000).state_dict()
    weights['fc.bias'][999], weights['fc.bias'][217] = 1e4, 1e3
    save_file(weights, str(tmp_path / 'teacher.safetensors'))
    caplog.set_level('INFO')
    assert main(['train', '--data-dir', str(data), '--class-map', str(tmp_path / 'classes.txt'),
                 '--output', str(tmp_path / 'out'), '--experiment', 'x', '--distill', 'sa', '--teacher', 'resnet18',
                 '--teacher-checkpoint', str(tmp_path / 'teacher.safetensors')] + FLAGS) == 0
    messages = [r.getMessage() for r in caplog.records]
    mapping = 'n03000684 -> 491, n01440764 -> 0, n02102040 -> 217'
    assert any(m.startswith('--teacher resnet18 has 1000 classes (the imagenet-1k synsets') and m.endswith(
        f"name ({mapping}).") for m in messages), messages
    top1 = _teacher_top1(tmp_path / 'teacher.safetensors', data, order, [491, 0, 217])
    assert top1 == 60.0 and _teacher_top1(tmp_path / 'teacher.safetensors', data, order, list(range(1000))) == 0
    assert f"Teacher resnet18 top-1 on 'validation': {top1:.2f}%" in messages
    run = tmp_path / 'out' / 'x'
    assert yaml.safe_load((run / 'args.yaml').read_text())['teacher_classes'] == [491, 0, 217]
    assert f'- **Teacher classes:** 3 of its 1000 (class -> teacher class: {mapping})' in \
        (run / 'model' / 'README.md').read_text()


def test_a_teacher_of_other_classes_is_refused_naming_the_folders_it_does_not_know(tmp_path, capsys):
    save_file(timm.create_model('resnet18', num_classes=1000).state_dict(), str(tmp_path / 'teacher.safetensors'))
    teacher = ['--distill', 'kd', '--teacher', 'resnet18', '--teacher-checkpoint', str(tmp_path / 'teacher.safetensors')]
    unrelated = _write_data(tmp_path / 'unrelated', ['c0', 'c1', 'c2'], [1, 1, 1])
    some = _write_data(tmp_path / 'some', ['cats', 'n01440764', 'n02102040'], [1, 1, 1])
    cases = {
        f"--teacher resnet18 has 1000 classes and the data '{unrelated / 'train'}' 3 class folders, 3 of which it "
        "does not know (c0, c1, c2; its classes are the imagenet-1k synsets": unrelated,
        f"the data '{some / 'train'}' 3 class folders, 1 of which it does not know (cats;": some,
    }
    for expected, data in cases.items():
        line = run_main(['train', '--data-dir', str(data), '--output', str(tmp_path / 'out')] + FLAGS + teacher, capsys)
        assert expected in line, line
    line = run_main(['train', '--data-dir', str(some), '--output', str(tmp_path / 'out'), '--num-classes', '5']
                    + FLAGS + teacher, capsys)
    assert 'has 1000 classes and the data' in line  # the unknown folder, before the flag
    assert not (tmp_path / 'out').exists()


def _classes_of(teacher: ModelName, classes, **flags) -> Namespace:
    """``check_classes`` of a dataset of ``classes`` (its folders, in order) with ``teacher``: the settled args."""
    args = Namespace(num_classes=None, data_dir='data', teacher_checkpoint=None, teacher_pretrained=False, rank=0,
                     **flags)
    dataset = SimpleNamespace(reader=SimpleNamespace(class_to_idx={c: k for k, c in enumerate(classes)}, root='data'))
    check_classes(args, dataset, ModelName('test_resnet', 'test_resnet'), teacher)
    return args


def test_a_model_folder_or_hub_teacher_whose_label_names_include_the_data_is_distilled_on_them(tmp_path, monkeypatch):
    labels = ['c4', 'c3', 'c2', 'c1', 'c0']
    teacher = _teacher(num_classes=5)
    folder = save_model_folder(teacher, str(tmp_path / 'teacher'), label_names=labels)
    source = resolve_model_name(f'local-dir:{folder}')
    assert _classes_of(source, ['c0', 'c1', 'c2']).teacher_classes == [4, 3, 2]
    assert _classes_of(source, ['c4', 'c3', 'c2', 'c1', 'c0']).teacher_classes is None  # its own classes
    assert _classes_of(source, ['c0', 'c1', 'c2', 'c3', 'c4']).teacher_classes == [4, 3, 2, 1, 0]  # reordered
    with pytest.raises(tsd.UsageError, match=re.escape("has 5 classes and the data 'data' 2 class folders, 1 of "
                                                       "which it does not know (x; its classes are its label_names")):
        _classes_of(source, ['c0', 'x'])
    # a cached Hub repo of the same folder, in the Python API by class names
    from huggingface_hub import constants
    repo = tmp_path / 'hub' / 'models--someone--tiny'
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text('abc123')
    shutil.copytree(folder, repo / 'snapshots' / 'abc123')
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'hub'))
    x = torch.randn(2, 3, 32, 32)
    for name in (f'local-dir:{folder}', 'hf-hub:someone/tiny'):
        task = tsd.create_distill_task('kd', timm.create_model('test_resnet', num_classes=3), name,
                                       teacher_classes=['c0', 'c1', 'c2'], img_size=32, verbose=False)
        assert task.teacher_classes == [4, 3, 2]
        with torch.no_grad():
            torch.testing.assert_close(task.restrict_teacher_logits(task.teacher.model(x)), teacher(x)[:, [4, 3, 2]])


def test_the_class_count_of_a_teachers_weights_is_read_before_it_is_built(tmp_path):
    save_file(timm.create_model('test_resnet', num_classes=7).state_dict(), str(tmp_path / 'w.safetensors'))
    torch.save({'state_dict': timm.create_model('test_resnet', num_classes=9).state_dict()}, tmp_path / 'w.pth.tar')
    name = ModelName('test_resnet', 'test_resnet')
    assert teacher_num_classes(name, str(tmp_path / 'w.safetensors'), False) == 7
    assert teacher_num_classes(name, str(tmp_path / 'w.pth.tar'), False) == 9
    assert teacher_num_classes(ModelName('resnet50.a1_in1k', 'resnet50.a1_in1k'), None, True) == 1000
    assert teacher_num_classes(ModelName('convnext_base.fb_in22k', 'convnext_base.fb_in22k'), None, True) == 21841
    assert teacher_num_classes(name, None, False) is None


def test_resuming_with_other_teacher_classes_is_refused():
    from timm_sadistill.training.resume_checks import check_resume_distill
    then = Namespace(distill_options={}, teacher_classes=[491, 0, 217])
    check_resume_distill('last.pth.tar', then, Namespace(distill='kd', distill_options={}, teacher_classes=[491, 0, 217]))
    check_resume_distill('last.pth.tar', Namespace(distill_options={}), Namespace(distill='kd', distill_options={},
                                                                                 teacher_classes=None))  # older run
    with pytest.raises(tsd.UsageError, match=re.escape("--resume 'last.pth.tar' is a run that distilled the teacher's "
                                                       "classes 491,0,217 (args.yaml teacher_classes), this command "
                                                       "its classes 0,217,491; resume with the run's data")):
        check_resume_distill('last.pth.tar', then, Namespace(distill='kd', distill_options={}, teacher_classes=[0, 217, 491]))
