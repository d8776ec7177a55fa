"""SA's ``gate``: the whole loss only while the teacher's running top-1 on the training batches beats the student's,
against a gate simulated here step by step in plain Python."""
import numpy as np
import pytest
import torch

import timm_sadistill as tsd
from timm_sadistill.errors import UsageError


def _batches(steps=45, batch=8, classes=4, seed=0):
    """(student logits, teacher logits, labels) of each step: the teacher right on about 60% of the images and the
    student on a share that grows from 0 to all, so the student catches up with the teacher part of the way."""
    rng = np.random.default_rng(seed)
    out = []
    for step in range(steps):
        labels = rng.integers(0, classes, batch)
        wrong = (labels + 1) % classes
        t_right = rng.random(batch) < 0.6
        s_right = rng.random(batch) < min(1.0, step / 15)
        if 25 <= step < 35:  # the student falls back: 'while_ahead' opens again, 'until_caught_up' stays shut
            s_right[:] = False
        t = np.eye(classes)[np.where(t_right, labels, wrong)] * 3.0
        s = np.eye(classes)[np.where(s_right, labels, wrong)] * 3.0
        out.append((torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32), torch.tensor(labels)))
    return out


def _expected_gates(batches, mode, momentum=0.9):
    running, gate, gates = None, 1.0, []
    for s, t, y in batches:
        batch = np.array([(t.argmax(-1) == y).float().mean().item(), (s.argmax(-1) == y).float().mean().item()])
        running = batch if running is None else momentum * running + (1 - momentum) * batch
        ahead = float(running[0] > running[1])
        gate = ahead if mode == 'while_ahead' else gate * ahead
        gates.append(gate)
    return gates


@pytest.mark.parametrize('mode', ['while_ahead', 'until_caught_up'])
def test_the_gate_multiplies_every_term_by_whether_the_teacher_still_leads(mode):
    batches = _batches()
    expected = _expected_gates(batches, mode)
    assert 0 in expected and expected[0] == 1  # the batches exercise both states
    if mode == 'while_ahead':
        assert expected.index(0) < len(expected) - 1 - expected[::-1].index(1)  # it closes, then opens again
    g = torch.Generator().manual_seed(0)
    s_feats, t_feats = [torch.randn(8, 3, 4, 4, generator=g)], [torch.randn(8, 3, 4, 4, generator=g)]
    plain = tsd.create_distill_loss('sa', student_channels=[3], teacher_channels=[3], connector='identity')
    gated = tsd.create_distill_loss('sa', student_channels=[3], teacher_channels=[3], connector='identity', gate=mode)
    for (s, t, y), gate in zip(batches, expected):
        terms = gated(s_feats, t_feats, s, t, y)
        reference = plain(s_feats, t_feats, s, t, y)
        assert set(terms) == set(reference)
        for name in terms:
            torch.testing.assert_close(terms[name], gate * reference[name])
        assert gated.reports() == {'distill_gate': torch.tensor(gate)}


def test_evaluation_neither_counts_a_batch_nor_moves_the_gate():
    s, t, y = _batches()[0]
    loss = tsd.create_distill_loss('sa', student_channels=[3], teacher_channels=[3], connector='identity',
                                   gate='until_caught_up', kd_weight=1.0)
    feats = [torch.zeros(8, 3, 4, 4)]
    loss.eval()
    loss(feats, feats, t, t, y)  # a student as right as the teacher: training would close the gate
    assert loss.teacher_lead.counted == 0 and loss.reports()['distill_gate'] == 1


def test_the_gate_state_is_in_the_state_dict_so_a_resumed_run_continues_it():
    batches = _batches()
    a = tsd.create_distill_loss('sa', student_channels=[3], teacher_channels=[3], connector='identity',
                                gate='while_ahead')
    feats = [torch.ones(8, 3, 4, 4)]
    for s, t, y in batches[:7]:
        a(feats, feats, s, t, y)
    b = tsd.create_distill_loss('sa', student_channels=[3], teacher_channels=[3], connector='identity',
                                gate='while_ahead')
    b.load_state_dict(a.state_dict())
    for s, t, y in batches[7:]:
        torch.testing.assert_close(b(feats, feats, s, t, y), a(feats, feats, s, t, y))
    assert {'teacher_lead.running', 'teacher_lead.counted', 'teacher_lead.open'} <= set(a.state_dict())


def test_without_a_gate_the_loss_reports_nothing_and_keeps_its_state_dict():
    loss = tsd.create_distill_loss('sa', student_channels=[3], teacher_channels=[3])
    assert loss.reports() == {} and not any(k.startswith('teacher_lead') for k in loss.state_dict())


def test_the_gate_needs_both_models_logits_and_the_labels():
    feats = [torch.zeros(2, 3, 4, 4)]
    loss = tsd.create_distill_loss('sa', student_channels=[3], teacher_channels=[3], kd_weight=0,
                                   gate='while_ahead')
    with pytest.raises(UsageError, match="gate='while_ahead'.*needs both models' logits"):
        loss(feats, feats, None, None, torch.tensor([0, 1]))
    with pytest.raises(UsageError, match="needs the labels"):
        loss(feats, feats, torch.zeros(2, 4), torch.zeros(2, 4), None)


def test_a_task_returns_the_gate_beside_the_terms_outside_the_distillation_loss():
    import timm
    torch.manual_seed(0)
    student, teacher = timm.create_model('test_resnet', num_classes=4), timm.create_model('test_resnet', num_classes=4)
    task = tsd.create_distill_task('sa', student, teacher, img_size=32, verbose=False, gate='until_caught_up')
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    out = task(x, y)
    student_top1 = (out['output'].argmax(-1) == y).float().mean() * 100
    assert out['distill_gate'] == float(out['teacher_top1'] > student_top1)  # the first batch is the running mean
    terms = {k: v for k, v in out.items() if k.startswith('sa_')}
    torch.testing.assert_close(out['kd_loss'], torch.stack(list(terms.values())).sum())


def test_a_teacher_level_with_the_student_is_not_ahead_and_the_gate_shuts():
    s, t, y = _batches()[0]
    feats = [torch.ones(8, 3, 4, 4)]
    for mode in ('while_ahead', 'until_caught_up'):
        loss = tsd.create_distill_loss('sa', student_channels=[3], teacher_channels=[3], connector='identity',
                                       gate=mode)
        terms = loss(feats, feats, t.clone(), t, y)  # the student as right as the teacher, image for image
        assert loss.reports()['distill_gate'] == 0 and all(v == 0 for v in terms.values())
