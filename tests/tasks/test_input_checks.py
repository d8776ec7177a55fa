"""Input sizes, channels and classes: auto pairs at the real input size, patch-14 ViTs pair with CNNs, ViTs at other
sizes, and one-line errors for models and inputs that cannot work together."""
import pytest
import timm
import torch
from safetensors.torch import save_file

import timm_sadistill as tsd
from timm_sadistill.cli import main as cli_main
from timm_sadistill.cli._common import run_command

from test_losses import FEATURE_ONLY, FEATURE_ONLY_IDS


def _step(task, size, classes=4):
    """One SGD step at ``size`` px; returns the result dict."""
    optimizer = torch.optim.SGD(task.trainable_module.parameters(), lr=0.01)
    task.train()
    out = task(torch.randn(2, 3, size, size), torch.tensor([0, classes - 1]))
    out['loss'].backward()
    optimizer.step()
    return out


def _error_lines(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if 'error:' in line]


def test_auto_refuses_an_input_of_another_size_than_it_paired_at():
    student = timm.create_model('test_resnet', num_classes=4)
    teacher = timm.create_model('resnet18', num_classes=4)
    guessed = tsd.create_distill_task('sa', student, teacher, verbose=False)  # pairs at the default 160 px
    # the last pair is the CAM term's, the maps the heads take at any size; auto chose the ones before it
    assert [t.name for t in guessed.teacher_stages][-2:] == ['layer4', 'layer4']  # 5x5 at 160 px, 2x2 at 64 px
    with pytest.raises(tsd.UsageError, match=r"160x160 \(the student's default.*input is 64x64: pass img_size=64"):
        guessed(torch.randn(2, 3, 64, 64), torch.tensor([0, 1]))
    told = tsd.create_distill_task('sa', student, teacher, img_size=64, verbose=False)
    assert [t.name for t in told.teacher_stages] == ['layer1', 'layer2', 'layer3', 'layer4']  # the rule drops layer4
    assert torch.isfinite(_step(told, 64)['loss'])
    with pytest.raises(tsd.UsageError, match='img_size=64x64, but the input is 96x96'):
        told(torch.randn(2, 3, 96, 96), torch.tensor([0, 1]))
    # named stages are the user's choice at any size
    named = tsd.create_distill_task('sa', student, teacher, student_stages=['layer4'], teacher_stages=['layer4'],
                                    verbose=False)
    assert torch.isfinite(_step(named, 64)['loss'])


@pytest.fixture(scope='module')
def eva14():
    """A patch-14 ViT (reduction 14, which no CNN stage has), random weights, at 70 px (a 5x5 grid)."""
    torch.manual_seed(0)
    return timm.create_model('eva02_tiny_patch14_224', num_classes=4, img_size=70)


@pytest.mark.parametrize('vit_role', ['teacher', 'student'])
def test_a_patch14_vit_pairs_with_a_cnn_by_nearest_reduction_and_trains(vit_role, eva14, capsys):
    cnn = timm.create_model('test_resnet', num_classes=4)
    student, teacher = (cnn, eva14) if vit_role == 'teacher' else (eva14, cnn)
    task = tsd.create_distill_task('sa', student, teacher, img_size=70, verbose=False)
    pairs = [(s.name, s.reduction, t.name, t.reduction) for s, t in zip(task.student_stages, task.teacher_stages)]
    cnn_stage, vit_stage = ('layer3', 16), ('blocks.11', 14)
    assert pairs == [(*cnn_stage, *vit_stage)] if vit_role == 'teacher' else [(*vit_stage, *cnn_stage)]
    out = _step(task, 70)
    assert torch.isfinite(out['loss']) and out['sa_dist'] > 0 and out['sa_att'] > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in task.distill_loss.parameters())
    # the stages command says which pairs are of unequal reduction
    names = ('test_resnet', 'eva02_tiny_patch14_224')
    student_name, teacher_name = names if vit_role == 'teacher' else names[::-1]
    assert cli_main(['stages', student_name, '--teacher', teacher_name, '--img-size', '70']) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(f'{pairs[0][0]} ('))
    assert f'{pairs[0][1]}->{pairs[0][3]}' in row.split()


def test_auto_resizes_the_student_map_when_the_maps_differ(capsys):
    # at 56 px the patch-14 grid is 4x4 and resnet's layer3 (4x4 by floor) is dropped by the rule: layer2 (7x7) pairs
    assert cli_main(['stages', 'eva02_tiny_patch14_224', '--teacher', 'resnet18', '--img-size', '56']) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith('blocks.11 ('))
    assert row.split()[-1] == '4x4->7x7' and 'layer2 (' in row and 'resized:' in out


def test_vit_at_another_size_than_its_default(tmp_path, capsys):
    assert cli_main(['stages', 'vit_tiny_patch16_224', '--img-size', '64']) == 0
    assert 'blocks.11  11     192       16         4x4  yes' in capsys.readouterr().out
    # a teacher given by name is built for the task's size; its checkpoint (at 160 px) is resampled to it
    torch.manual_seed(0)
    save_file(timm.create_model('test_vit', num_classes=4).state_dict(), str(tmp_path / 'vit.safetensors'))
    student = timm.create_model('test_resnet', num_classes=4)
    task = tsd.create_distill_task('sa', student, 'test_vit', teacher_pretrained_path=str(tmp_path / 'vit.safetensors'),
                                   img_size=64, verbose=False)
    assert task.teacher.model.patch_embed.img_size == (64, 64)
    assert torch.isfinite(_step(task, 64)['loss'])
    # a ViT built for another size is refused before anything runs, saying how to build it
    vit224 = timm.create_model('vit_tiny_patch16_224', num_classes=4)
    with pytest.raises(tsd.UsageError, match=r'teacher .* built for 224x224 inputs, not img_size 64x64.*img_size=64'):
        tsd.create_distill_task('sa', student, vit224, img_size=64, verbose=False)


@pytest.mark.parametrize('argv,flag_and_fix', [
    (['stages', 'resnet18', '--img-size', '-5'], '--img-size -5: the input size is a positive number'),
    (['stages', 'resnet18', '--img-size', '0'], '--img-size 0: the input size is a positive number'),
    (['stages', 'vit_tiny_patch16_224', '--img-size', '60'], '--img-size 60x60 is not a multiple of the model'),
    (['stages', 'resnet18', '--teacher', 'vit_tiny_patch16_224', '--img-size', '60'],
     '--img-size 60x60 is not a multiple of the teacher vit_tiny_patch16_224'),
])
def test_bad_input_sizes_exit_2_with_one_line(argv, flag_and_fix, capsys):
    assert cli_main(argv) == 2
    out_and_err = capsys.readouterr()
    errors = [line for line in out_and_err.err.splitlines() if 'error:' in line]
    assert len(errors) == 1 and flag_and_fix in errors[0] and 'e.g.' in errors[0], out_and_err
    assert out_and_err.out == ''  # nothing printed before the error


@pytest.mark.parametrize('method,options', [
    *((name, {}) for name in tsd.list_distill_losses() if tsd.get_distill_loss_class(name).compares_logits()),
    ('sa', {'cam_weight': 0.0}),  # its logit term still compares them
])
def test_logit_losses_refuse_models_of_different_class_counts(method, options):
    student = timm.create_model('test_resnet', num_classes=3)
    teacher = timm.create_model('resnet18', num_classes=5)
    with pytest.raises(tsd.UsageError, match='student has 3 classes and the teacher 5'):
        tsd.create_distill_task(method, student, teacher, img_size=64, verbose=False, **options)


@pytest.mark.parametrize('method,options', FEATURE_ONLY, ids=FEATURE_ONLY_IDS)
def test_feature_losses_take_models_of_different_class_counts(method, options):
    student = timm.create_model('test_resnet', num_classes=3)
    teacher = timm.create_model('resnet18', num_classes=5)
    task = tsd.create_distill_task(method, student, teacher, img_size=64, verbose=False, **options)
    assert torch.isfinite(_step(task, 64, classes=3)['loss'])


@pytest.mark.parametrize('options', [{}, {'cam_weight': 1.0}], ids=['default', 'explicit'])
def test_feature_only_sa_turns_the_cam_term_off_for_models_of_different_class_counts(options):
    student = timm.create_model('test_resnet', num_classes=3)
    teacher = timm.create_model('resnet18', num_classes=5)
    task = tsd.create_distill_task('sa', student, teacher, img_size=64, verbose=False, kd_weight=0.0, **options)
    assert len(task.notices) == 1 and 'cam_weight=1.0 is off' in task.notices[0], task.notices
    assert 'the student has 3 classes and the teacher 5' in task.notices[0]
    # the records say what trains: no CAM term, no head-map pair
    assert task.distill_loss.option_values['cam_weight'] == 0.0 and not task.distill_loss.head_maps
    assert [s.name for s in task.student_stages] == ['layer1', 'layer2', 'layer3']
    out = _step(task, 64, classes=3)
    assert 'sa_cam' not in out and torch.isfinite(out['loss'])


@pytest.mark.parametrize('channels', [1, 4])
def test_inputs_of_another_channel_count_are_refused_naming_both(channels):
    task = tsd.create_distill_task('sa', timm.create_model('test_resnet', num_classes=4),
                                   timm.create_model('resnet18', num_classes=4), img_size=64, verbose=False)
    with pytest.raises(tsd.UsageError, match=f'input has {channels} channels but the student and teacher take 3'):
        task(torch.randn(2, channels, 64, 64), torch.tensor([0, 1]))


@pytest.mark.parametrize('method', tsd.list_distill_losses())
def test_an_empty_batch_is_refused_for_every_loss_in_the_task_and_called_alone(method):
    student, teacher = timm.create_model('test_resnet', num_classes=4), timm.create_model('resnet18', num_classes=4)
    task = tsd.create_distill_task(method, student, teacher, img_size=32, verbose=False)
    with pytest.raises(tsd.UsageError, match=r'shape \(0, 3, 32, 32\); pass a batch of images \(B, C, H, W\) with '
                                             r'B >= 1 \(skip empty batches'):
        task(torch.randn(0, 3, 32, 32), torch.zeros(0, dtype=torch.long))
    loss = task.distill_loss
    empty = [torch.zeros(0, c, 4, 4) for c in loss.student_channels]
    with pytest.raises(tsd.UsageError, match=rf'{type(loss).__name__} got an empty batch \(0 samples\)'):
        loss(empty, [torch.zeros(0, c, 4, 4) for c in loss.teacher_channels], torch.zeros(0, 4), torch.zeros(0, 4),
             torch.zeros(0, dtype=torch.long))


@pytest.mark.parametrize('target, expected', [
    (torch.tensor([0.0, 1.0]), r'class indices of dtype torch.float32; class indices are integers: pass target.long\(\)'),
    (torch.tensor([0, 1, 2]), r'3 class indices for a batch of 2 images'),
    (torch.tensor([0, 4]), r'class indices from 0 to 4, outside 0..3 of the student\'s 4 classes'),
    (torch.tensor([-1, 1]), r'class indices from -1 to 1, outside 0..3'),
    (torch.tensor([[0, 1, 0, 0], [1, 0, 0, 0]]), r'soft targets of dtype torch.int64; soft targets are probabilities'),
    (torch.full((2, 3), 1 / 3), r'soft targets of shape \(2, 3\) for 2 images and 4 classes; pass \(2, 4\)'),
    (torch.zeros(2, 4, 1), r'The labels have shape \(2, 4, 1\)'),
])
def test_labels_of_the_wrong_dtype_shape_or_range_are_refused_naming_the_fix(target, expected):
    student, teacher = timm.create_model('test_resnet', num_classes=4), timm.create_model('resnet18', num_classes=4)
    task = tsd.create_distill_task('kd', student, teacher, img_size=32, verbose=False)
    with pytest.raises(tsd.UsageError, match=expected):
        task(torch.randn(2, 3, 32, 32), target)
    assert torch.isfinite(task(torch.randn(2, 3, 32, 32), torch.tensor([0, 3]))['loss'])
    assert torch.isfinite(task(torch.randn(2, 3, 32, 32), torch.full((2, 4), 0.25))['loss'])  # mixup's soft targets


def test_a_student_in_another_dtype_or_on_another_device_than_the_task_is_refused_at_creation():
    teacher = timm.create_model('resnet18', num_classes=4)
    with pytest.raises(tsd.UsageError, match=r"The student's parameters are float64, but the task builds the teacher "
                                             r"and the connectors in float32; create the task with dtype=torch.float64"):
        tsd.create_distill_task('sa', timm.create_model('test_resnet', num_classes=4).double(), teacher, img_size=32,
                                verbose=False)
    with pytest.raises(tsd.UsageError, match=r"The student's parameters are on cpu, but the task puts the teacher and "
                                             r"the connectors on meta; move the student there first"):
        tsd.create_distill_task('sa', timm.create_model('test_resnet', num_classes=4), teacher, img_size=32,
                                device=torch.device('meta'), verbose=False)
    # a task built in the student's dtype puts the teacher and the connectors there too, and trains
    task = tsd.create_distill_task('sa', timm.create_model('test_resnet', num_classes=4).double(), teacher,
                                   img_size=32, dtype=torch.float64, verbose=False)
    assert {p.dtype for p in task.trainable_module.parameters()} == {torch.float64}
    out = task(torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1]))
    out['loss'].backward()
    assert torch.isfinite(out['loss'])


@pytest.mark.parametrize('side, stages', [('student_stages', ['layer4', 'layer4']), ('teacher_stages', [-1, 'layer4'])])
def test_a_stage_named_twice_is_refused(side, stages, capsys):
    student, teacher = timm.create_model('test_resnet', num_classes=4), timm.create_model('resnet18', num_classes=4)
    other = 'teacher_stages' if side == 'student_stages' else 'student_stages'
    with pytest.raises(tsd.UsageError, match=rf"{side} names stage 'layer4' twice \(layer4, layer4\); name each "
                                             "stage once"):
        tsd.create_distill_task('at', student, teacher, img_size=32, verbose=False,
                                **{side: stages, other: ['layer3', 'layer4']})
    flag = '--distill-stages' if side == 'student_stages' else '--teacher-stages'
    assert run_command('timm-sadistill train', lambda: tsd.create_distill_task(
        'at', student, teacher, img_size=32, verbose=False, **{side: stages, other: ['layer3', 'layer4']})) == 2
    assert _error_lines(capsys)[0].startswith(f"timm-sadistill train: error: {flag} names stage 'layer4' twice")
