"""Attention-map pictures and the stage inspector: the library functions and the `stages` / `viz` commands."""
import argparse
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import timm_sadistill as tsd
from timm_sadistill.attention_maps import attention_maps, render_attention_maps, save_attention_maps

from conftest import make_pattern_images, train_steps

pytestmark = pytest.mark.slow  # a trained teacher or a CLI subprocess in nearly every test

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_cli(subcommand: str, *args: str, cwd=None, prelude: str = '') -> subprocess.CompletedProcess:
    """``python -m timm_sadistill <subcommand> args``, i.e. ``timm-sadistill ...`` (``prelude`` runs first, e.g. to
    hide matplotlib)."""
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, HF_HUB_OFFLINE='1', TRITON_INTERPRET='1', MPLBACKEND='Agg')
    if prelude:
        argv = [subcommand, *args]
        code = f"{prelude}\nimport sys\nfrom timm_sadistill.cli import main\nsys.exit(main({argv!r}))"
        command = [sys.executable, '-c', code]
    else:
        command = [sys.executable, '-m', 'timm_sadistill', subcommand, *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


@pytest.fixture(scope='module')
def teacher(pattern_data) -> torch.nn.Module:
    """A small teacher fitted to the pattern data (test_resnet: seconds on a CPU, where resnet18 takes a minute)."""
    torch.manual_seed(1)
    model = timm.create_model('test_resnet', num_classes=4)
    train_steps(model, *pattern_data, steps=30, lr=3e-3)
    return model.eval()


def sa_task(teacher: torch.nn.Module, seed: int = 0) -> tsd.DistillTask:
    torch.manual_seed(seed)
    student = timm.create_model('test_resnet', num_classes=4)
    return tsd.create_distill_task('sa', student, teacher, img_size=64, verbose=False)


# ---------------------------------------------------------------- stages


def test_stages_lists_feature_info_rows():
    result = run_cli('stages', 'test_resnet', '--img-size', '64')
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.strip()}
    for stage in tsd.list_stages(timm.create_model('test_resnet')):
        name, index, channels, reduction, size = lines[stage.name][:5]
        assert (int(index), int(channels), int(reduction)) == (stage.index, stage.channels, stage.reduction)
        side = max(1, 64 // stage.reduction)
        assert size == f'{side}x{side}'
    assert {'layer1', 'layer2', 'layer3', 'layer4'} <= set(lines)


def test_stages_shows_sa_pairing_and_connectors():
    result = run_cli('stages', 'test_resnet', '--teacher', 'resnet18', '--img-size', '64')
    assert result.returncode == 0, result.stderr
    student, teacher = timm.create_model('test_resnet'), timm.create_model('resnet18')
    s_stages, t_stages = tsd.pair_stages(student, teacher, img_size=64, policy='all')
    assert [s.name for s in s_stages] == ['layer1', 'layer2', 'layer3']  # layer4 is 2x2 at 64 px: auto drops it
    pair_lines = result.stdout.split('pairs chosen by auto')[1].splitlines()
    for s, t in zip(s_stages, t_stages):
        row = next(line for line in pair_lines if line.startswith(f'{s.name} ({s.channels})'))
        assert f'{t.name} ({t.channels})' in row
        assert f'conv1x1 {s.channels}->{t.channels}' in row


def test_stages_follows_the_method_policy():
    result = run_cli('stages', 'test_resnet', '--teacher', 'resnet18', '--img-size', '64', '--distill', 'cwd')
    assert result.returncode == 0, result.stderr
    pairs = result.stdout.split('pairs chosen by auto')[1]
    assert 'layer3 (192)' in pairs and 'conv1x1 192->256' in pairs and 'layer1 (' not in pairs


def test_stages_unknown_model_is_a_clean_error():
    result = run_cli('stages', 'no_such_net')
    assert result.returncode == 2
    assert 'Traceback' not in result.stderr
    assert "unknown model 'no_such_net'" in result.stderr.lower() and 'timm.list_models' in result.stderr


# ---------------------------------------------------------------- attention maps


def test_attention_maps_are_what_the_loss_compares(teacher, pattern_data):
    task = sa_task(teacher)
    images = pattern_data[0][:6]
    maps = attention_maps(task, images)
    spatial = len(task.distill_loss.connectors)  # the pairs SA's spatial terms take; the CAM's pair comes last
    pairs = zip(task.student_stages[:spatial], task.teacher_stages[:spatial])
    assert [(m.student_stage, m.teacher_stage) for m in maps] == [(s.name, t.name) for s, t in pairs]
    assert task.training  # restored
    task.eval()
    with torch.no_grad():
        out = task(images, pattern_data[1][:6])
    for m, side in zip(maps, (16, 8, 4)):
        assert m.teacher.shape == m.student.shape == (6, side, side)
        torch.testing.assert_close(m.teacher.flatten(1).norm(dim=1), torch.ones(6))
        # L_att of each image is the squared distance between the two drawn maps
        torch.testing.assert_close(((m.student - m.teacher) ** 2).sum(dim=(1, 2)), m.att, rtol=1e-4, atol=1e-6)
    # per-image terms average to the batch terms the task trains on (eval mode: BN uses running statistics)
    torch.testing.assert_close(torch.stack([m.dist.mean() for m in maps]).mean() * maps[0].alpha, out['sa_dist'])
    torch.testing.assert_close(torch.stack([m.att.mean() for m in maps]).mean() * maps[0].beta, out['sa_att'])


def test_distilled_student_matches_the_teacher_maps_better(teacher, pattern_data):
    """Looked at as a person would: after a few dozen SA steps the student's maps are closer to the teacher's."""
    task = sa_task(teacher)
    held_out = make_pattern_images(per_class=3, seed=1)[0]
    before = attention_maps(task, held_out)
    train_steps(task, *pattern_data, steps=30, lr=1e-3)
    after = attention_maps(task, held_out)
    loss_before = torch.stack([m.loss.mean() for m in before]).mean()
    loss_after = torch.stack([m.loss.mean() for m in after]).mean()
    assert loss_after < 0.7 * loss_before, (float(loss_before), float(loss_after))
    for b, a in zip(before, after):
        assert a.att.mean() < b.att.mean(), (b.student_stage, float(b.att.mean()), float(a.att.mean()))


def test_render_grid_and_save_from_a_loader(teacher, pattern_data, tmp_path):
    task = sa_task(teacher)
    images, labels = pattern_data
    loader = [(images[:5], labels[:5])]
    path = save_attention_maps(task, loader, str(tmp_path / 'run'), max_images=3)
    assert path == str(tmp_path / 'run' / 'attention_maps.png')
    width, height = Image.open(path).size
    assert abs((width / 7) / (height / 3) - 1) < 0.25  # 3 rows, 1 + 2 * 3 stage pairs columns of square-ish cells
    with pytest.raises(tsd.UsageError, match='one label per image'):
        render_attention_maps(images[:2], attention_maps(task, images[:2]), str(tmp_path / 'x.png'), titles=['a'])


def test_attention_maps_refuse_a_non_sa_task(teacher, pattern_data):
    student = timm.create_model('test_resnet', num_classes=4)
    task = tsd.create_distill_task('at', student, teacher, img_size=64, verbose=False)
    with pytest.raises(tsd.UsageError, match="create_distill_task\\('sa'"):
        attention_maps(task, pattern_data[0][:2])


def test_render_without_matplotlib_says_how_to_install(monkeypatch, pattern_data, tmp_path):
    monkeypatch.setitem(sys.modules, 'matplotlib', None)
    with pytest.raises(tsd.MissingExtraError, match=r'pip install timm-sadistill\[viz\]') as raised:
        render_attention_maps(pattern_data[0][:1], [], str(tmp_path / 'x.png'))
    assert isinstance(raised.value, ImportError)  # what Python callers expect of a missing package


# ---------------------------------------------------------------- viz command


@pytest.fixture(scope='module')
def viz_files(tmp_path_factory):
    """Two generated PNGs, a teacher safetensors, and a student checkpoint as `train` writes them."""
    folder = tmp_path_factory.mktemp('viz')
    rng = np.random.RandomState(0)
    for i in range(2):
        pixels = (rng.rand(72, 72, 3) * 80).astype('uint8')
        pixels[(i * 36):(i * 36 + 36), :36] = 230  # a bright quadrant the maps can find
        Image.fromarray(pixels).save(folder / f'img{i}.png')
    torch.manual_seed(0)
    random_teacher = timm.create_model('resnet18', num_classes=4)
    save_file(random_teacher.state_dict(), str(folder / 'teacher.safetensors'))
    task = sa_task(random_teacher)
    state = task.get_checkpoint_state()
    assert set(state) == {'state_dict', 'task_state'} and 'distill_loss' in state['task_state']
    torch.save({'epoch': 3, 'arch': 'test_resnet', 'args': argparse.Namespace(model='test_resnet'), **state},
               folder / 'last.pth.tar')
    save_file(task.get_eval_model().state_dict(), str(folder / 'model.safetensors'))
    return folder


def viz_args(folder, checkpoint: str, *extra: str):
    return ('--teacher', 'resnet18', '--teacher-checkpoint', str(folder / 'teacher.safetensors'),
            '--model', 'test_resnet', '--checkpoint', str(folder / checkpoint), '--num-classes', '4',
            '--img-size', '64', str(folder / 'img0.png'), str(folder / 'img1.png'), *extra)


def test_viz_command_writes_the_grid(viz_files):
    out = viz_files / 'maps.png'
    result = run_cli('viz', *viz_args(viz_files, 'last.pth.tar', '-o', str(out)))
    assert result.returncode == 0, result.stderr
    assert 'connector' not in result.stderr  # the checkpoint carries the trained connectors: no warning
    width, height = Image.open(out).size
    assert width > height > 0
    assert abs((width / 7) / (height / 2) - 1) < 0.25  # 2 image rows; image + teacher/student for 3 stage pairs


def test_viz_command_with_a_bare_student_warns_about_connectors(viz_files):
    out = viz_files / 'bare.png'
    result = run_cli('viz', *viz_args(viz_files, 'model.safetensors', '-o', str(out)))
    assert result.returncode == 0, result.stderr
    assert 'no connector state' in result.stderr and out.is_file()


def test_viz_command_user_errors(viz_files, tmp_path):
    wrong_classes = run_cli('viz', '--teacher', 'resnet18', '--model', 'test_resnet', '--num-classes', '10',
                            '--checkpoint', str(viz_files / 'last.pth.tar'), str(viz_files / 'img0.png'))
    missing_image = run_cli('viz', '--teacher', 'resnet18', '--model', 'test_resnet', 'nope.png')
    data = (viz_files / 'last.pth.tar').read_bytes()
    (tmp_path / 'truncated.pth.tar').write_bytes(data[:len(data) // 2])
    truncated = run_cli('viz', '--teacher', 'resnet18', '--model', 'test_resnet', '--num-classes', '4',
                        '--checkpoint', str(tmp_path / 'truncated.pth.tar'), str(viz_files / 'img0.png'))
    for result, words in ((wrong_classes, '--num-classes'), (missing_image, "image 'nope.png' does not exist"),
                          (truncated, 'cannot be read: it is truncated')):
        assert result.returncode == 2 and 'Traceback' not in result.stderr
        assert 'error:' in result.stderr and words in result.stderr


def test_viz_command_without_matplotlib_says_how_to_install(viz_files, tmp_path):
    result = run_cli('viz', *viz_args(viz_files, 'last.pth.tar', '-o', str(tmp_path / 'm.png')),
                     prelude="import sys; sys.modules['matplotlib'] = None")
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert 'pip install timm-sadistill[viz]' in result.stderr
    assert not (tmp_path / 'm.png').exists()


def test_viz_command_builds_a_vit_teacher_for_the_picture_size(viz_files, tmp_path):
    """A fixed-size model (ViT) at another --img-size than its default is built for that size, as in train."""
    out = tmp_path / 'vit.png'
    result = run_cli('viz', '--teacher', 'vit_tiny_patch16_224', '--model', 'test_resnet', '--img-size', '64',
                     str(viz_files / 'img0.png'), '-o', str(out))
    assert result.returncode == 0, result.stderr
    assert out.is_file()
