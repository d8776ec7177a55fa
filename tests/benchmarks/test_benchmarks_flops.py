"""The FLOP helper of benchmarks/overhead.py: its counts add up to independently counted parts.

FlopCounterMode counts matmuls and convolutions from their shapes alone, so the checks are exact (no tolerance):
  * KD's step = plain training's step + the teacher's forward, counted on its own: the teacher takes no backward,
    the student's forward and backward are the same graph in both, and the KD term is elementwise (uncounted);
  * SA's spatial terms' step (``cam_weight=0``) = KD's step + its connectors' forward and backward, counted on
    their own: the terms (softmaxes, |x|^p maps, norms) are elementwise too, and resizing (pooling) is not counted;
  * SA's default step = that + the class-activation maps: each head at every position of its final map (the
    student's forward and backward, the teacher's forward).
A change that adds counted work to a loss, or a helper that misses a part of the step, breaks the equalities.
"""
import sys
from pathlib import Path

import pytest
import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / 'benchmarks'))
import overhead  # noqa: E402

pytestmark = pytest.mark.slow  # the module's FLOP counts trace whole training steps

TEACHER, STUDENT, IMG_SIZE, NUM_CLASSES, IMAGES = 'resnet18', 'test_resnet', 64, 10, 2
SPATIAL = 'sa[cam_weight=0]'  # SA without its CAM term: the spatial terms and the logit term


@pytest.fixture(scope='module')
def batch():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(IMAGES, 3, IMG_SIZE, IMG_SIZE, generator=g),
            torch.randint(0, NUM_CLASSES, (IMAGES,), generator=g))


@pytest.fixture(scope='module')
def flops(batch):
    x, y = batch
    return {method: overhead.step_flops(overhead.build(method, TEACHER, STUDENT, NUM_CLASSES, IMG_SIZE,
                                                       torch.device('cpu'))[0], x, y)
            for method in ('none', 'kd', SPATIAL, 'sa')}


def test_kd_step_is_plain_step_plus_teacher_forward(flops, batch):
    x, _ = batch
    teacher = timm.create_model(TEACHER, num_classes=NUM_CLASSES).eval()
    with torch.no_grad():
        teacher_forward = overhead.count_flops(lambda: teacher(x)) / IMAGES
    assert teacher_forward > 0
    assert flops['kd'].step == flops['none'].step + teacher_forward
    assert flops['kd'].connector_params == flops['kd'].connector_forward == 0


def test_sa_step_is_kd_step_plus_connectors_forward_and_backward(flops, batch):
    x, y = batch
    task, _ = overhead.build(SPATIAL, TEACHER, STUDENT, NUM_CLASSES, IMG_SIZE, torch.device('cpu'))
    connectors = task.distill_loss.connectors
    with torch.no_grad():
        _, student_feats = task.trainable_module.student_taps(x)
    leaves = [f.detach().requires_grad_() for f in student_feats]

    def forward():
        return sum(connector(leaf).sum() for connector, leaf in zip(connectors, leaves))

    forward_flops = overhead.count_flops(forward) / IMAGES
    forward_backward = overhead.count_flops(lambda: forward().backward()) / IMAGES
    assert forward_flops > 0 and forward_backward > forward_flops
    assert flops[SPATIAL].connector_forward == forward_flops
    assert flops[SPATIAL].step == flops['kd'].step + forward_backward
    assert flops[SPATIAL].connector_params == sum(p.numel() for p in connectors.parameters()) > 0


def test_default_sa_step_adds_each_head_at_every_position_of_its_final_map(flops, batch):
    from einops import rearrange
    x, _ = batch
    task, _ = overhead.build('sa', TEACHER, STUDENT, NUM_CLASSES, IMG_SIZE, torch.device('cpu'))
    student, teacher = task.trainable_module.student, task.teacher.model
    with torch.no_grad():
        s_final = student.forward_features(x)
        t_final = teacher.forward_features(task.teacher_input(x))

    def positions(m):  # every position of a (B, C, H, W) map as a 1x1 map
        return rearrange(m, 'b c h w -> (b h w) c 1 1')

    leaf = positions(s_final).detach().requires_grad_()
    student_cam = overhead.count_flops(lambda: student.forward_head(leaf).sum().backward())
    with torch.no_grad():
        teacher_cam = overhead.count_flops(lambda: teacher.forward_head(positions(t_final)))
    assert student_cam > 0 and teacher_cam > 0
    assert flops['sa'].step == flops[SPATIAL].step + (student_cam + teacher_cam) / IMAGES
    assert flops['sa'].connector_params == flops[SPATIAL].connector_params  # the CAM pair has no connector


def test_flops_report_gives_gmacs_and_ratios(flops):
    models = {'teacher_forward': 2e9, 'teacher_params': 1e6, 'student_forward': 1e9, 'student_params': 1e6}
    lines = overhead.flops_report(flops, models, TEACHER, STUDENT, IMG_SIZE)
    kd_row = next(line for line in lines if line.startswith('| kd |'))
    cells = [c.strip() for c in kd_row.strip('|').split('|')]
    assert cells[1] == f"{flops['kd'].step / 2e9:.2f}"  # GMACs = FLOPs / 2
    assert cells[2] == f"{flops['kd'].step / flops['none'].step:.2f}" and cells[3] == '1.00'
    assert any('1.00 GMACs' in line and '0.50 GMACs' in line for line in lines)
