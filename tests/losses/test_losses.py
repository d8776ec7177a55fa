"""Every loss against an independent implementation written here from the paper's formula: values and gradients."""
import math

import pytest
import torch
import torch.nn.functional as F

import timm_sadistill as tsd
from timm_sadistill.losses import align_spatial

SHAPES = [  # (B, [(Cs, Hs, Ws, Ct, Ht, Wt), ...], K)
    (2, [(8, 8, 8, 16, 8, 8)], 5),
    (3, [(4, 16, 16, 6, 8, 8), (6, 4, 4, 10, 4, 4)], 7),
    (2, [(5, 3, 5, 5, 3, 5), (3, 1, 1, 2, 1, 1)], 3),
]


def _inputs(shape, seed=0, dtype=torch.float32):
    b, stages, k = shape
    g = torch.Generator().manual_seed(seed)
    s = [torch.randn(b, cs, hs, ws, generator=g, dtype=dtype).requires_grad_() for cs, hs, ws, _, _, _ in stages]
    t = [torch.randn(b, ct, ht, wt, generator=g, dtype=dtype) for _, _, _, ct, ht, wt in stages]
    s_logits = torch.randn(b, k, generator=g, dtype=dtype).requires_grad_()
    t_logits = torch.randn(b, k, generator=g, dtype=dtype)
    target = torch.randint(0, k, (b,), generator=g)
    return s, t, s_logits, t_logits, target


def _channels(shape):
    return dict(student_channels=[st[0] for st in shape[1]], teacher_channels=[st[3] for st in shape[1]])


def _kl_rows(p_t, p_s):
    """sum_i p_t(i) * (log p_t(i) - log p_s(i)) for each row."""
    return (p_t * (p_t.log() - p_s.log())).sum(-1)


def _assert_same(loss_terms, expected, params, rtol=1e-5):
    got = sum(loss_terms.values())
    torch.testing.assert_close(got.double(), expected.double(), rtol=rtol, atol=1e-6)
    g_got = torch.autograd.grad(got, params, retain_graph=True, allow_unused=True)
    g_exp = torch.autograd.grad(expected, params, allow_unused=True)
    for a, b in zip(g_got, g_exp):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('temperature', [1.0, 4.0])
def test_kd_matches_hinton(shape, temperature):
    s, t, sl, tl, y = _inputs(shape)
    loss = tsd.create_distill_loss('kd', temperature=temperature)
    p_s = torch.softmax(sl / temperature, -1)
    p_t = torch.softmax(tl / temperature, -1)
    expected = temperature ** 2 * _kl_rows(p_t, p_s).mean()
    _assert_same(loss(s, t, sl, tl), expected, [sl])


def _zscore(z):
    """Each row minus its mean, over its sample standard deviation (K - 1) plus 1e-7, written out."""
    k = z.shape[-1]
    mean = z.sum(-1, keepdim=True) / k
    std = ((z - mean) ** 2).sum(-1, keepdim=True).div(k - 1).sqrt()
    return (z - mean) / (std + 1e-7)


def _lskd(sl, tl, temperature, sample_weight=None):
    """Sun et al.'s KD on z-scored logits: tau^2 * mean_b w_b KL(softmax(Z(t)/tau) || softmax(Z(s)/tau))."""
    per_sample = _kl_rows(torch.softmax(_zscore(tl) / temperature, -1), torch.softmax(_zscore(sl) / temperature, -1))
    w = torch.ones_like(per_sample) if sample_weight is None else sample_weight
    return temperature ** 2 * (w * per_sample).mean()


def test_lskd_is_registered_with_the_authors_defaults():
    assert tsd.loss_options('lskd').defaults == {'student_channels': (), 'teacher_channels': (), 'temperature': 2.0,
                                                 'weight': 9.0}
    cls = tsd.get_distill_loss_class('lskd')
    assert cls.stage_policy == 'none' and cls.compares_logits() and cls.feature_only_options() is None
    assert 'Logit Standardization in Knowledge Distillation' in cls.__doc__


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('temperature,weight', [(2.0, 9.0), (1.0, 1.0), (4.0, 0.5)])
def test_lskd_matches_kd_on_z_scored_logits(shape, temperature, weight):
    s, t, sl, tl, y = _inputs(shape)
    loss = tsd.create_distill_loss('lskd', temperature=temperature, weight=weight)
    _assert_same(loss(s, t, sl, tl), weight * _lskd(sl, tl, temperature), [sl])


def test_lskd_ignores_a_per_sample_shift_and_scale_of_either_models_logits():
    s, t, sl, tl, y = _inputs(SHAPES[1])
    g = torch.Generator().manual_seed(1)
    scale, shift = torch.rand(3, 1, generator=g) * 5 + 0.1, torch.randn(3, 1, generator=g) * 10
    lskd, kd = tsd.create_distill_loss('lskd'), tsd.create_distill_loss('kd', temperature=2.0)
    base = lskd(s, t, sl, tl)['lskd']
    torch.testing.assert_close(lskd(s, t, sl, tl * scale + shift)['lskd'], base, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lskd(s, t, sl * scale + shift, tl)['lskd'], base, rtol=1e-5, atol=1e-6)
    # KD on the raw logits is not: the standardisation is what takes the scale away
    assert not torch.allclose(kd(s, t, sl, tl * scale + shift)['kd'], kd(s, t, sl, tl)['kd'], rtol=1e-3)


@pytest.mark.parametrize('weighting', ['none', 'teacher_confidence'])
def test_sa_logit_term_can_be_lskd(weighting):
    shape = SHAPES[1]
    s, t, sl, tl, y = _inputs(shape)
    options = dict(**_channels(shape), temperature=2.0, kd_weight=0.5, logit_weighting=weighting)
    torch.manual_seed(0)
    terms = tsd.create_distill_loss('sa', logit_loss='lskd', **options)(s, t, sl, tl, y)
    torch.manual_seed(0)
    with_kd = tsd.create_distill_loss('sa', logit_loss='kd', **options)(s, t, sl, tl, y)
    assert set(terms) == set(with_kd) - {'sa_kd'} | {'sa_lskd'}
    w = torch.softmax(tl, -1).gather(1, y[:, None])[:, 0] if weighting == 'teacher_confidence' else None
    _assert_same({'sa_lskd': terms['sa_lskd']}, 0.5 * _lskd(sl, tl, 2.0, w), [sl])
    # the feature terms do not depend on the logit term's choice
    for key in set(terms) - {'sa_lskd'}:
        torch.testing.assert_close(terms[key], with_kd[key])


def _at_map(f):
    a = f.pow(2).mean(1).view(f.shape[0], -1)
    return a / a.norm(dim=1, keepdim=True)


@pytest.mark.parametrize('shape', SHAPES)
def test_at_code_mode_matches_authors_formula(shape):
    s, t, sl, tl, y = _inputs(shape)
    loss = tsd.create_distill_loss('at', **_channels(shape))
    expected = 0
    for fs, ft in zip(s, t):
        a_s = fs.pow(2).mean(1, keepdim=True)
        a_s = align_spatial(a_s, ft.shape[-2:]) if a_s.shape[-2:] != ft.shape[-2:] else a_s
        a_s = a_s.flatten(1) / a_s.flatten(1).norm(dim=1, keepdim=True)
        expected = expected + (a_s - _at_map(ft)).pow(2).mean()
    _assert_same(loss(s, t, sl, tl), 1000 * expected, s)


def test_at_paper_mode_is_the_non_squared_norm():
    shape = SHAPES[0]
    s, t, sl, tl, y = _inputs(shape)
    loss = tsd.create_distill_loss('at', mode='paper', **_channels(shape))
    d = _at_map(s[0]) - _at_map(t[0])
    b, n = d.shape
    expected = 1000 / 2 * sum(math.sqrt(float((d[i].detach() ** 2).sum())) for i in range(b)) / (b * n)
    got = loss(s, t, sl, tl)['at']
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-7)
    # gradient of ||d||_2 is d / ||d||_2
    g = torch.autograd.grad(got, s[0])[0]
    ref = torch.autograd.grad(1000 / 2 * d.norm(dim=1).sum() / (b * n), s[0])[0]
    torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize('shape', SHAPES)
def test_fitnet_is_mse_of_the_regressor(shape):
    s, t, sl, tl, y = _inputs(shape)
    torch.manual_seed(0)  # the regressors' init, so the gradient tolerance does not hang on the tests run before
    loss = tsd.create_distill_loss('fitnet', **_channels(shape))
    expected = 0
    for k, (fs, ft) in enumerate(zip(s, t)):
        r = loss.connectors[k](fs)
        if r.shape[-2:] != ft.shape[-2:]:
            r = align_spatial(r, ft.shape[-2:])
        expected = expected + ((r - ft) ** 2).sum() / ft.numel()
    expected = 100 * expected / len(s)
    _assert_same(loss(s, t, sl, tl), expected, s + list(loss.parameters()))


def _channel_spatial_kl(fs, ft, tau):
    """tau^2/(B*C) * sum over (b, c) of KL between spatial softmaxes, one row at a time."""
    b, c = ft.shape[:2]
    total = 0
    for i in range(b):
        for j in range(c):
            p_t = torch.softmax(ft[i, j].flatten() / tau, 0)
            p_s = torch.softmax(fs[i, j].flatten() / tau, 0)
            total = total + (p_t * (p_t.log() - p_s.log())).sum()
    return tau ** 2 * total / (b * c)


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('tau', [1.0, 4.0])
def test_cwd_matches_channel_wise_kl(shape, tau):
    s, t, sl, tl, y = _inputs(shape)
    loss = tsd.create_distill_loss('cwd', tau=tau, **_channels(shape))
    expected = 0
    for k, (fs, ft) in enumerate(zip(s, t)):
        expected = expected + _channel_spatial_kl(align_spatial(loss.connectors[k](fs), ft.shape[-2:]), ft, tau)
    _assert_same(loss(s, t, sl, tl), 3.0 * expected / len(s), s + list(loss.parameters()))


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('soft_target', [False, True])
def test_dkd_matches_decoupled_formula(shape, soft_target):
    s, t, sl, tl, y = _inputs(shape)
    alpha, beta, tau = 1.0, 8.0, 4.0
    loss = tsd.create_distill_loss('dkd', alpha=alpha, beta=beta, temperature=tau)
    # float64 reference: KL of near-equal distributions scaled by tau^2 * beta = 128 shows float32 rounding at 1e-5
    p_s = torch.softmax(sl.double() / tau, -1)
    p_t = torch.softmax(tl.double() / tau, -1)
    tckd = nckd = 0
    for i, label in enumerate(y.tolist()):
        bt = torch.stack([p_t[i, label], 1 - p_t[i, label]])
        bs = torch.stack([p_s[i, label], 1 - p_s[i, label]])
        tckd = tckd + (bt * (bt.log() - bs.log())).sum()
        others = [k for k in range(sl.shape[1]) if k != label]
        qt = p_t[i, others] / p_t[i, others].sum()
        qs = p_s[i, others] / p_s[i, others].sum()
        nckd = nckd + (qt * (qt.log() - qs.log())).sum()
    b = sl.shape[0]
    expected = tau ** 2 * (alpha * tckd + beta * nckd) / b
    target = F.one_hot(y, sl.shape[1]).float() * 0.9 + 0.1 / sl.shape[1] if soft_target else y
    terms = loss(s, t, sl, tl, target)
    assert set(terms) == {'dkd_tckd', 'dkd_nckd'}
    _assert_same(terms, expected, [sl], rtol=1e-4)


def test_dkd_without_labels_says_so():
    s, t, sl, tl, y = _inputs(SHAPES[0])
    with pytest.raises(tsd.UsageError, match='labels'):
        tsd.create_distill_loss('dkd')(s, t, sl, tl)


def _sa_expected(loss, s, t, sl, tl, tau, p, alpha, beta, kd_weight, temperature):
    dist = att = 0
    for k, (fs, ft) in enumerate(zip(s, t)):
        sp = align_spatial(loss.connectors[k](fs), ft.shape[-2:])
        dist = dist + _channel_spatial_kl(sp, ft, tau)
        b = ft.shape[0]
        for i in range(b):
            a_s = sp[i].abs().pow(p).mean(0).flatten()
            a_t = ft[i].abs().pow(p).mean(0).flatten()
            att = att + ((a_s / a_s.norm() - a_t / a_t.norm()) ** 2).sum() / b
    n = len(s)
    p_s = torch.softmax(sl / temperature, -1)
    p_t = torch.softmax(tl / temperature, -1)
    kd = temperature ** 2 * _kl_rows(p_t, p_s).mean()
    return alpha * dist / n + beta * att / n + (kd_weight * kd if kd_weight else 0)


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('options', [
    dict(tau=4.0, p=2.0, alpha=1.0, beta=10.0, kd_weight=1.0, temperature=4.0, connector='bottleneck'),
    dict(tau=1.0, p=1.0, alpha=0.5, beta=3.0, kd_weight=0.0, temperature=2.0, connector='conv1x1'),
])
def test_sa_matches_design_formula(shape, options):
    s, t, sl, tl, y = _inputs(shape)
    loss = tsd.create_distill_loss('sa', **_channels(shape), **options)
    terms = loss(s, t, sl, tl)
    assert set(terms) == ({'sa_dist', 'sa_att', 'sa_kd'} if options['kd_weight'] else {'sa_dist', 'sa_att'})
    option_values = {k: v for k, v in options.items() if k != 'connector'}
    expected = _sa_expected(loss, s, t, sl, tl, **option_values)
    _assert_same(terms, expected, s + [sl] + list(loss.parameters()))


def test_sa_terms_are_weighted_separately():
    shape = SHAPES[0]
    s, t, sl, tl, y = _inputs(shape)
    loss = tsd.create_distill_loss('sa', alpha=2.0, beta=5.0, kd_weight=0.0, **_channels(shape))
    per_stage = loss.stage_terms(s, t)
    terms = loss(s, t, sl, tl)
    torch.testing.assert_close(terms['sa_dist'], 2.0 * per_stage[:, 0].mean())
    torch.testing.assert_close(terms['sa_att'], 5.0 * per_stage[:, 1].mean())


@pytest.mark.parametrize('name', tsd.list_distill_losses())
@pytest.mark.parametrize('amp_dtype', [torch.float16, torch.bfloat16])
def test_large_half_precision_activations_stay_finite(name, amp_dtype):
    shape = (2, [(8, 8, 8, 16, 8, 8)], 5)
    s, t, sl, tl, y = _inputs(shape)
    # |x| up to ~4e4 (float16 holds 65504): x**2 overflows float16, so every softmax, power and norm must run in float32
    s = [(f.detach() * 1e4).to(amp_dtype).requires_grad_() for f in s]
    t = [(f * 1e4).to(amp_dtype) for f in t]
    sl = (sl.detach() * 3e3).to(amp_dtype).requires_grad_()
    tl = (tl * 3e3).to(amp_dtype)
    logits_only = tsd.get_distill_loss_class(name).stage_policy == 'none'
    loss = tsd.create_distill_loss(name, **({} if logits_only else _channels(shape)))
    with torch.autocast('cpu', dtype=amp_dtype):
        terms = loss(s, t, sl, tl, y)
    total = sum(v.float() for v in terms.values())
    assert torch.isfinite(total)
    total.backward()
    for g in [sl.grad] + [f.grad for f in s]:
        if g is not None:
            assert torch.isfinite(g).all()


def test_feature_channel_mismatch_is_a_clear_error():
    shape = SHAPES[0]
    s, t, sl, tl, y = _inputs(shape)
    loss = tsd.create_distill_loss('sa', student_channels=[9], teacher_channels=[16])
    with pytest.raises(tsd.UsageError, match=r'built for student channels \[9\]'):
        loss(s, t, sl, tl)


def test_feature_losses_need_channels():
    with pytest.raises(tsd.UsageError, match='student_channels and teacher_channels'):
        tsd.create_distill_loss('sa')
    with pytest.raises(tsd.UsageError, match='one entry per stage pair'):
        tsd.create_distill_loss('at', student_channels=[1, 2], teacher_channels=[1])


# SA's measured defaults (docs/method.md#defaults): changing one is a decision, not a side effect
SA_DEFAULTS = {'tau': 4.0, 'p': 2.0, 'alpha': 1.0, 'beta': 10.0, 'kd_weight': 1.0, 'temperature': 16.0, 'logit_loss': 'kd',
               'logit_weighting': 'none', 'teacher_correction': 'none', 'gate': 'none',
               'connector': 'conv1x1', 'backend': 'auto', 'standardize': False, 'warmup_steps': 0, 'ramp_steps': 0,
               'cam_weight': 1.0}


def test_sa_options_are_declared_once_in_the_constructor():
    declared = tsd.loss_options('sa').options
    defaults = tsd.loss_options('sa').defaults
    # the channel counts and head_maps are the task's to fill in, not options
    assert {k: v for k, v in defaults.items() if k not in ('student_channels', 'teacher_channels', 'head_maps')} == SA_DEFAULTS
    assert {name: option.default for name, option in declared.items()} == SA_DEFAULTS
    for option in declared.values():
        assert f'{option.name}: {option.help}' in tsd.SADistillLoss.__doc__
    assert 'SADistillLoss' in tsd.SADistillTask.__doc__ and "loss_options('sa')" in tsd.SADistillTask.__doc__
    loss = tsd.create_distill_loss('sa', student_channels=[4], teacher_channels=[8], beta=5)
    assert loss.option_values == {**SA_DEFAULTS, 'beta': 5}


# the losses that compare no logits, each with the options that make it so, as it declares them
FEATURE_ONLY = [(name, tsd.get_distill_loss_class(name).feature_only_options()) for name in tsd.list_distill_losses()
                if tsd.get_distill_loss_class(name).feature_only_options() is not None]
FEATURE_ONLY_IDS = ['-'.join([name, *(f'{k}-{v:g}' for k, v in options.items())]) for name, options in FEATURE_ONLY]


def test_the_feature_only_losses_are_the_ones_that_compare_no_logits():
    assert {name for name, _ in FEATURE_ONLY} >= {'at', 'fitnet', 'cwd', 'sa'}
    assert FEATURE_ONLY_IDS[-1] == 'sa-kd_weight-0'
    for name, options in FEATURE_ONLY:
        cls = tsd.get_distill_loss_class(name)
        # a task turns the terms on the heads' maps off for models of different class counts
        fitted = cls.without_final_pair('', **options)[0] if cls.uses_final_pair(**options) else options
        assert not cls.compares_logits(**fitted), name
    assert tsd.get_distill_loss_class('kd').feature_only_options() is None


@pytest.mark.parametrize('name,options', FEATURE_ONLY, ids=FEATURE_ONLY_IDS)
def test_feature_only_losses_take_no_logits(name, options):
    shape = SHAPES[1]
    s, t, sl, tl, y = _inputs(shape)
    torch.manual_seed(0)
    loss = tsd.create_distill_loss(name, **_channels(shape), **options)
    without = loss(s, t, None, None)
    with_logits = loss(s, t, sl, tl)
    assert set(without) == set(with_logits)
    for key in without:
        torch.testing.assert_close(without[key], with_logits[key])
    sum(without.values()).backward()
    assert all(f.grad is not None for f in s)


def test_sa_logit_term_without_logits_says_how_to_turn_it_off():
    shape = SHAPES[0]
    s, t, sl, tl, y = _inputs(shape)
    loss = tsd.create_distill_loss('sa', **_channels(shape))
    with pytest.raises(tsd.UsageError, match='kd_weight=0 to distil features only'):
        loss(s, t, None, None)
