"""DIST (Huang et al. 2022) against a formula written here with numpy's corrcoef."""
import numpy as np
import pytest
import timm
import torch

import timm_sadistill as tsd


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _reference(s: torch.Tensor, t: torch.Tensor, tau: float, beta: float, gamma: float) -> float:
    """beta * tau^2 * mean_b (1 - r(p^S_b, p^T_b)) + gamma * tau^2 * mean_k (1 - r(p^S_:k, p^T_:k)), in float64."""
    p_s, p_t = _softmax(s.double().numpy() / tau), _softmax(t.double().numpy() / tau)
    inter = np.mean([1 - np.corrcoef(a, b)[0, 1] for a, b in zip(p_s, p_t)])
    intra = np.mean([1 - np.corrcoef(a, b)[0, 1] for a, b in zip(p_s.T, p_t.T)]) if gamma else 0.0
    return tau ** 2 * (beta * inter + gamma * intra)


def test_dist_is_registered_with_the_papers_imagenet_defaults():
    options = tsd.loss_options('dist').defaults
    assert options['beta'] == 1.0 and options['gamma'] == 1.0 and options['temperature'] == 1.0
    assert tsd.get_distill_loss_class('dist').stage_policy == 'none'


@pytest.mark.parametrize('tau,beta,gamma', [(1.0, 1.0, 1.0), (4.0, 2.0, 2.0), (2.0, 0.5, 3.0)])
def test_dist_matches_the_correlation_formula(tau, beta, gamma):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g) * 3, torch.randn(6, 5, generator=g) * 3
    terms = tsd.create_distill_loss('dist', beta=beta, gamma=gamma, temperature=tau)([], [], s, t)
    assert set(terms) == {'dist_inter', 'dist_intra'}
    assert float(sum(terms.values())) == pytest.approx(_reference(s, t, tau, beta, gamma), rel=1e-5)
    # each term alone, so that swapping the axes of one cannot hide behind the other
    assert float(terms['dist_inter']) == pytest.approx(_reference(s, t, tau, beta, 0.0), rel=1e-5)
    assert float(terms['dist_intra']) == pytest.approx(_reference(s, t, tau, 0.0, gamma), rel=1e-5)


def test_dist_is_zero_for_a_student_that_is_the_teacher_up_to_scale_and_shift_of_probabilities():
    t = torch.randn(8, 10)
    terms = tsd.create_distill_loss('dist')([], [], t.clone(), t)
    assert float(sum(terms.values())) == pytest.approx(0.0, abs=1e-5)


def test_gradient_reaches_the_student_logits_only():
    s = torch.randn(4, 6, requires_grad=True)
    t = torch.randn(4, 6)
    sum(tsd.create_distill_loss('dist')([], [], s, t).values()).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_one_sample_has_no_intra_class_term_and_still_trains_on_the_inter_term():
    s = torch.randn(1, 5, requires_grad=True)
    t = torch.randn(1, 5)
    terms = tsd.create_distill_loss('dist')([], [], s, t)
    assert terms['dist_intra'].item() == 0.0
    assert terms['dist_inter'].item() == pytest.approx(_reference(s.detach(), t, 1.0, 1.0, 0.0), rel=1e-5)
    sum(terms.values()).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_precision_logits_are_computed_in_float32(dtype):
    g = torch.Generator().manual_seed(1)
    s, t = (torch.randn(8, 10, generator=g) * 20).to(dtype), (torch.randn(8, 10, generator=g) * 20).to(dtype)
    terms = tsd.create_distill_loss('dist', temperature=4.0)([], [], s, t)
    assert all(v.dtype == torch.float32 for v in terms.values())
    # the reference sees the same rounded inputs: any gap would come from half-precision math inside
    assert float(sum(terms.values())) == pytest.approx(_reference(s.float(), t.float(), 4.0, 1.0, 1.0), rel=1e-5)


def test_nonpositive_temperature_is_refused():
    # declared Annotated[float, Positive]: the registry refuses it, as it does every bound
    with pytest.raises(tsd.UsageError, match=r'DISTLoss: temperature must be > 0, got 0\.0\.'):
        tsd.create_distill_loss('dist', temperature=0.0)


def test_three_training_steps_through_the_task():
    torch.manual_seed(0)
    student = timm.create_model('test_resnet', num_classes=4)
    teacher = timm.create_model('test_resnet', num_classes=4).eval()
    task = tsd.create_distill_task('dist', student, teacher, img_size=32, verbose=False)
    assert task.student_stages == [] and task.teacher_stages == []
    optimizer = torch.optim.SGD(task.trainable_module.parameters(), lr=0.05)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    task.train()
    before = [p.detach().clone() for p in student.parameters()]
    for _ in range(3):
        out = task(x, y)
        assert {'dist_inter', 'dist_intra'} <= set(out) and torch.isfinite(out['loss'])
        optimizer.zero_grad()
        out['loss'].backward()
        optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_sa_logit_term_can_be_dist_at_sa_temperature_weighted_by_kd_weight():
    g = torch.Generator().manual_seed(2)
    s_feat, t_feat = torch.randn(4, 8, 4, 4, generator=g), torch.randn(4, 16, 4, 4, generator=g)
    s, t = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    common = dict(student_channels=[8], teacher_channels=[16], temperature=2.0, kd_weight=0.5)
    torch.manual_seed(0)
    with_kd = tsd.create_distill_loss('sa', **common)([s_feat], [t_feat], s, t)
    torch.manual_seed(0)
    with_dist = tsd.create_distill_loss('sa', logit_loss='dist', **common)([s_feat], [t_feat], s, t)
    assert 'sa_kd' in with_kd and 'sa_dist_logits' not in with_kd
    assert 'sa_dist_logits' in with_dist and 'sa_kd' not in with_dist
    assert float(with_dist['sa_dist_logits']) == pytest.approx(0.5 * _reference(s, t, 2.0, 1.0, 1.0), rel=1e-5)
    # the feature terms do not depend on the logit term's choice
    assert torch.equal(with_kd['sa_dist'], with_dist['sa_dist']) and torch.equal(with_kd['sa_att'], with_dist['sa_att'])
    with pytest.raises(tsd.UsageError, match="Unknown logit_loss 'kl'"):
        tsd.create_distill_loss('sa', logit_loss='kl', **common)


@pytest.mark.parametrize('logit_loss', ['kd', 'dist'])
def test_teacher_confidence_weights_each_samples_logit_term_by_the_teachers_probability_of_the_label(logit_loss):
    g = torch.Generator().manual_seed(3)
    s_feat, t_feat = torch.randn(4, 8, 4, 4, generator=g), torch.randn(4, 16, 4, 4, generator=g)
    s, t = torch.randn(4, 5, generator=g) * 2, torch.randn(4, 5, generator=g) * 2
    y = torch.tensor([0, 3, 1, 4])
    loss = tsd.create_distill_loss('sa', student_channels=[8], teacher_channels=[16], temperature=2.0,
                                   logit_loss=logit_loss, logit_weighting='teacher_confidence')
    got = loss([s_feat], [t_feat], s, t, y)
    key = 'sa_kd' if logit_loss == 'kd' else 'sa_dist_logits'
    w = _softmax(t.double().numpy())[np.arange(4), y.numpy()]
    p_s, p_t = _softmax(s.double().numpy() / 2), _softmax(t.double().numpy() / 2)
    if logit_loss == 'kd':
        per_sample = (p_t * (np.log(p_t) - np.log(p_s))).sum(-1)
        assert float(got[key]) == pytest.approx(4 * np.mean(w * per_sample), rel=1e-5)
    else:
        inter = np.mean([wb * (1 - np.corrcoef(a, b)[0, 1]) for wb, a, b in zip(w, p_s, p_t)])
        expected = 4 * inter + _reference(s, t, 2.0, 0.0, 1.0)  # the intra term takes no weights
        assert float(got[key]) == pytest.approx(expected, rel=1e-5)
    # a soft target puts the expected probability of the label in place of the hard one
    soft = torch.nn.functional.one_hot(y, 5).float()
    assert torch.allclose(loss([s_feat], [t_feat], s, t, soft)[key], got[key])
    with pytest.raises(tsd.UsageError, match='needs the labels'):
        loss([s_feat], [t_feat], s, t)


def _sa_logit_term(y, **options):
    """SA's KD logit term at T 2 on fixed logits where the teacher's top class is the label for samples 0 and 2 only."""
    g = torch.Generator().manual_seed(4)
    s_feat, t_feat = torch.randn(4, 8, 4, 4, generator=g), torch.randn(4, 16, 4, 4, generator=g)
    s = torch.randn(4, 5, generator=g) * 2
    t = torch.tensor([[4.0, 1, 0, -1, 2], [3.0, 0, 1, 2, -2], [0.0, 1, 5, 2, 1], [1.0, 2, 0, 0, 3]])
    loss = tsd.create_distill_loss('sa', student_channels=[8], teacher_channels=[16], temperature=2.0, **options)
    return s, t, loss([s_feat], [t_feat], s, t, y)['sa_kd'], lambda target: loss([s_feat], [t_feat], s, t, target)


def _kd_rows(s, t, temperature):
    p_s, p_t = _softmax(s.double().numpy() / temperature), _softmax(t.double().numpy() / temperature)
    return temperature ** 2 * (p_t * (np.log(p_t) - np.log(p_s))).sum(-1)


def test_teacher_correct_turns_the_logit_term_off_where_the_teachers_top_class_is_not_the_label():
    y = torch.tensor([0, 2, 2, 1])  # the teacher's top classes are 0, 0, 2, 4
    s, t, got, call = _sa_logit_term(y, logit_weighting='teacher_correct')
    per_sample = _kd_rows(s, t, 2.0)
    assert float(got) == pytest.approx((per_sample[0] + per_sample[2]) / 4, rel=1e-5)  # still divided by B
    assert torch.allclose(call(torch.nn.functional.one_hot(y, 5).float() * 0.9 + 0.02)['sa_kd'], got)  # soft: its top class
    with pytest.raises(tsd.UsageError, match='needs the labels'):
        call(None)


def test_swap_trades_the_teachers_logits_of_its_top_class_and_the_label_where_they_differ():
    y = torch.tensor([0, 2, 2, 1])
    s, t, got, call = _sa_logit_term(y, teacher_correction='swap')
    corrected = t.clone()
    corrected[1, [0, 2]] = torch.tensor([1.0, 3.0])  # top class 0 (3.0) and label 2 (1.0) trade
    corrected[3, [4, 1]] = torch.tensor([2.0, 3.0])  # top class 4 (3.0) and label 1 (2.0) trade
    assert float(got) == pytest.approx(_kd_rows(s, corrected, 2.0).mean(), rel=1e-5)
    assert float(got) != pytest.approx(_kd_rows(s, t, 2.0).mean(), rel=1e-3)
    with pytest.raises(tsd.UsageError, match='needs the labels'):
        call(None)
