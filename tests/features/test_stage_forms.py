"""Every stage form docs/stages.md documents (names, indices, negative indices, submodule paths, ``auto``), for every
registered method, through ``create_distill_task`` and through the command line (``stages`` and a short ``train``).

Methods on logits only (KD, DKD) take no stages: an explicit form is refused with a one-line error, ``auto`` taps
nothing.
"""
import copy
import logging

import pytest
import timm
import torch
from safetensors.torch import save_file

import timm_sadistill as tsd
from timm_sadistill.cli import main as cli_main
from test_cli import NUM_CLASSES, write_image_folder

METHODS = tsd.list_distill_losses()
TEACHER, STUDENT = 'resnet18', 'test_resnet'

# form -> (student stages, teacher stages) as Python values, as command-line values, and the stage names they
# select on test_resnet / resnet18 (None: 'auto', whose pairs depend on the method's policy)
FORMS = {
    'names': (['layer2', 'layer3'], ['layer2', 'layer3'], 'layer2,layer3', 'layer2,layer3', ['layer2', 'layer3']),
    'indices': ([2, 3], [2, 3], '2,3', '2,3', ['layer2', 'layer3']),
    'negative indices': ([-3, -2], [-3, -2], '-3,-2', '-3,-2', ['layer2', 'layer3']),
    'submodule paths': (['layer3.0.conv2'], ['layer3.1.conv2'], 'layer3.0.conv2', 'layer3.1.conv2', None),
    'auto': ('auto', 'auto', 'auto', 'auto', None),
}
# the auto pairs at 64 px (layer1..layer3 of both: layer4 is 2x2) as each stage policy picks them
AUTO_PAIRS = {'all': ['layer1', 'layer2', 'layer3'], 'last': ['layer3'], 'middle': ['layer2'], 'none': []}
# the maps both heads take: a method whose terms run the heads on them (SA's CAM term) distils them as a last pair
HEAD_MAPS = 'layer4'


def _expected(method, form):
    """(student stage names, teacher stage names) the form selects for the method; None when it must be refused."""
    student, teacher, _, _, names = FORMS[form]
    cls = tsd.get_distill_loss_class(method)
    heads = [HEAD_MAPS] if cls.uses_final_pair() else []
    if form == 'auto':
        return AUTO_PAIRS[cls.stage_policy] + heads, AUTO_PAIRS[cls.stage_policy] + heads
    if cls.stage_policy == 'none':
        return None
    return (names + heads, names + heads) if names else (student + heads, teacher + heads)


@pytest.fixture(scope='module')
def models():
    """(student, teacher), built once: each test trains a copy of the student."""
    torch.manual_seed(0)
    return timm.create_model(STUDENT, num_classes=NUM_CLASSES), timm.create_model(TEACHER, num_classes=NUM_CLASSES)


@pytest.mark.parametrize('form', list(FORMS))
@pytest.mark.parametrize('method', METHODS)
def test_python_api_takes_every_documented_stage_form(method, form, models):
    student, teacher = copy.deepcopy(models[0]), models[1]
    student_stages, teacher_stages = FORMS[form][:2]
    expected = _expected(method, form)
    build = lambda: tsd.create_distill_task(  # noqa: E731
        method, student, teacher, student_stages=student_stages, teacher_stages=teacher_stages, img_size=64,
        verbose=False)
    if expected is None:
        with pytest.raises(tsd.UsageError, match='logits only'):
            build()
        return
    task = build()
    assert ([s.name for s in task.student_stages], [t.name for t in task.teacher_stages]) == expected
    optimizer = torch.optim.SGD(task.trainable_module.parameters(), lr=0.01)
    task.train()
    out = task(torch.randn(2, 3, 64, 64), torch.tensor([0, 2]))
    assert torch.isfinite(out['loss'])
    out['loss'].backward()
    optimizer.step()


@pytest.mark.parametrize('method', METHODS)
def test_stages_command_prints_the_auto_pairs_of_every_method(method, capsys):
    assert cli_main(['stages', STUDENT, '--teacher', TEACHER, '--img-size', '64', '--distill', method]) == 0
    out = capsys.readouterr().out
    pairs = AUTO_PAIRS[tsd.get_distill_loss_class(method).stage_policy]
    if not pairs:
        assert 'distils logits only' in out
    for name in pairs:
        assert any(line.startswith(f'{name} (') and f' {name} (' in line for line in out.splitlines()), out
    # the pair a task distils last for the terms on the heads' maps (SA's CAM term), listed after the table
    heads = [line for line in out.splitlines() if line.startswith('and last, the maps the heads take')]
    assert len(heads) == tsd.get_distill_loss_class(method).uses_final_pair(), out
    assert all(line.endswith(f'{HEAD_MAPS} (96) -> {HEAD_MAPS} (512)') for line in heads), heads


@pytest.fixture(scope='module')
def cli_workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp('stage_forms')
    write_image_folder(root / 'data', per_class=2, val_per_class=1)
    torch.manual_seed(0)
    save_file(timm.create_model(TEACHER, num_classes=NUM_CLASSES).state_dict(), str(root / 'teacher.safetensors'))
    return root


@pytest.mark.slow
@pytest.mark.parametrize('form', list(FORMS))
@pytest.mark.parametrize('method', METHODS)
def test_train_command_takes_every_documented_stage_form(method, form, cli_workdir, caplog, capsys):
    _, _, student_flag, teacher_flag, _ = FORMS[form]
    expected = _expected(method, form)
    # the values follow their flags as separate words, as the README writes '--teacher-stages -2,-1'
    argv = [
        'train', '--data-dir', str(cli_workdir / 'data'), '--model', STUDENT, '--num-classes', str(NUM_CLASSES),
        '--img-size', '64', '-b', '6', '--workers', '0', '--epochs', '1', '--lr', '0.01', '--warmup-epochs', '0',
        '--output', str(cli_workdir / 'out'), '--experiment', f'{method}-{form.replace(" ", "-")}',
        '--distill', method, '--teacher', TEACHER, '--teacher-checkpoint', str(cli_workdir / 'teacher.safetensors'),
        '--distill-stages', student_flag, '--teacher-stages', teacher_flag,
    ]
    with caplog.at_level(logging.INFO):
        status = cli_main(argv)
    err = capsys.readouterr().err
    if expected is None:
        errors = [line for line in err.splitlines() if 'error:' in line]
        assert status == 2 and len(errors) == 1 and 'logits only' in errors[0], err
        assert not (cli_workdir / 'out' / f'{method}-{form.replace(" ", "-")}').exists()
        return
    assert status == 0, err
    pairs = ', '.join(f'{s}->{t}' for s, t in zip(*expected)) or 'logits only'
    assert f'stages [{pairs}]' in caplog.text
