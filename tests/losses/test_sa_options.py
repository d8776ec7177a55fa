"""SA's optional terms (standardised maps, warm-up, teacher-head reuse, class-activation maps) against formulas
written here independently, on real timm models where the term needs their heads."""
import pytest
import timm
import torch
import torch.nn.functional as F

import timm_sadistill as tsd


def _models(student='test_resnet', teacher='resnet18', num_classes=5, seed=0):
    torch.manual_seed(seed)
    return (timm.create_model(student, num_classes=num_classes).eval(),
            timm.create_model(teacher, num_classes=num_classes).eval())


def _kl_spatial(s, t, tau):
    p_s = torch.softmax(s.flatten(2) / tau, -1)
    p_t = torch.softmax(t.flatten(2) / tau, -1)
    return tau ** 2 * (p_t * (p_t.log() - p_s.log())).sum(-1).mean()


def _att(x, p):
    return F.normalize(x.abs().pow(p).mean(1).flatten(1), dim=1)


def test_standardize_z_scores_each_map_before_the_spatial_softmax():
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(2, 3, 4, 4, generator=g).requires_grad_()]
    t = [3.0 * torch.randn(2, 3, 4, 4, generator=g) + 1.0]
    loss = tsd.create_distill_loss('sa', student_channels=[3], teacher_channels=[3], connector='identity',
                                   standardize=True, kd_weight=0, tau=2.0, alpha=1.0, beta=10.0)

    def z(x):
        return (x - x.mean((-2, -1), keepdim=True)) / (x.std((-2, -1), keepdim=True) + 1e-5)

    expected = _kl_spatial(z(s[0]), z(t[0]), 2.0) + 10.0 * (_att(s[0], 2.0) - _att(t[0], 2.0)).pow(2).sum(-1).mean()
    got = sum(loss(s, t, None, None).values())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # a shift and scale of the teacher's maps no longer changes L_dist
    shifted = tsd.create_distill_loss('sa', student_channels=[3], teacher_channels=[3], connector='identity',
                                      standardize=True, kd_weight=0, beta=0.0)
    torch.testing.assert_close(shifted(s, t, None, None)['sa_dist'],
                               shifted(s, [5 * t[0] - 2], None, None)['sa_dist'], rtol=1e-4, atol=1e-5)


def test_warmup_ramps_the_feature_terms_linearly_and_counts_training_steps_only():
    g = torch.Generator().manual_seed(1)
    s, t = [torch.randn(2, 3, 4, 4, generator=g)], [torch.randn(2, 3, 4, 4, generator=g)]
    logits_s, logits_t = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    full = tsd.create_distill_loss('sa', student_channels=[3], teacher_channels=[3], connector='identity')
    ramped = tsd.create_distill_loss('sa', student_channels=[3], teacher_channels=[3], connector='identity',
                                     warmup_steps=4)
    reference = full(s, t, logits_s, logits_t)
    ramped.eval()
    assert ramped(s, t, logits_s, logits_t)['sa_dist'] == 0  # evaluation does not advance the ramp
    ramped.train()
    for step in range(6):
        got = ramped(s, t, logits_s, logits_t)
        scale = min(1.0, step / 4)
        torch.testing.assert_close(got['sa_dist'], scale * reference['sa_dist'])
        torch.testing.assert_close(got['sa_att'], scale * reference['sa_att'])
        torch.testing.assert_close(got['sa_kd'], reference['sa_kd'])  # the logit term is not ramped
    assert int(ramped.state_dict()['steps']) == 6  # saved with the connectors, so a resume keeps its place


def test_ramp_steps_ramps_every_term_and_composes_with_the_feature_warmup():
    g = torch.Generator().manual_seed(2)
    s, t = [torch.randn(2, 3, 4, 4, generator=g)], [torch.randn(2, 3, 4, 4, generator=g)]
    logits_s, logits_t = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    reference = tsd.create_distill_loss('sa', student_channels=[3], teacher_channels=[3], connector='identity')(
        s, t, logits_s, logits_t)
    ramped = tsd.create_distill_loss('sa', student_channels=[3], teacher_channels=[3], connector='identity',
                                     ramp_steps=5, warmup_steps=2)
    ramped.eval()
    assert all(v == 0 for v in ramped(s, t, logits_s, logits_t).values())  # evaluation does not advance it
    ramped.train()
    for step in range(7):
        got = ramped(s, t, logits_s, logits_t)
        whole, features = min(1.0, step / 5), min(1.0, step / 2)
        torch.testing.assert_close(got['sa_kd'], whole * reference['sa_kd'])
        for name in ('sa_dist', 'sa_att'):
            torch.testing.assert_close(got[name], whole * features * reference[name])
    assert int(ramped.state_dict()['steps']) == 7


def test_cam_term_compares_normalised_class_activation_maps():
    student, teacher = _models()
    task = tsd.create_distill_task('sa', student, teacher, img_size=96, cam_weight=3.0, kd_weight=0, verbose=False)
    x = torch.randn(2, 3, 96, 96)
    task.eval()
    out = task(x, torch.zeros(2, dtype=torch.long))
    with torch.no_grad():
        def cam(model, x):  # a ResNet head is average pooling then fc: CAM = W F + b at every position
            f = model.forward_features(x)
            return torch.einsum('kc,bchw->bkhw', model.fc.weight, f) + model.fc.bias.view(1, -1, 1, 1)
        cam_s = cam(student, x)  # both 3x3 at 96 px
        cam_t = cam(teacher, task.teacher.normalize_input(x, task.student_mean, task.student_std))
        cam_s = F.normalize(cam_s.flatten(2), dim=-1)
        cam_t = F.normalize(cam_t.flatten(2), dim=-1)
        expected = 3.0 * (cam_s - cam_t).pow(2).sum(-1).mean()
    torch.testing.assert_close(out['sa_cam'], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('student,teacher', [('mobilenetv3_small_050', 'convnext_atto'), ('test_convnext', 'test_resnet'),
                                             ('test_efficientnet', 'test_mambaout')])  # forward_features' maps
def test_cam_term_trains_across_families(student, teacher):
    s, t = _models(student, teacher)
    task = tsd.create_distill_task('sa', s, t, img_size=64, cam_weight=1.0, verbose=False)
    optimizer = torch.optim.AdamW(task.trainable_module.parameters(), lr=1e-3)
    task.train()
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 5, (4,))
    student_before = {k: v.clone() for k, v in s.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in t.state_dict().items()}
    for _ in range(2):
        out = task(x, y)
        optimizer.zero_grad()
        out['loss'].backward()
        optimizer.step()
    assert torch.isfinite(out['loss']) and torch.isfinite(out['sa_cam']) and out['sa_cam'] > 0
    assert any(not torch.equal(student_before[k], v) for k, v in s.state_dict().items())
    assert all(torch.equal(teacher_before[k], v) for k, v in t.state_dict().items())


@pytest.mark.parametrize('options', [{}, {'cam_weight': 2.0}], ids=['default', 'explicit'])
def test_a_loss_built_on_its_own_takes_every_pair_as_spatial_and_has_no_cam_term(options):
    """No task taps the heads' maps for it: it has no heads to run, so the CAM term has no pair to take."""
    for channels in ([8], [8, 16]):  # one pair: a pair reserved for the CAM would leave no spatial pair
        loss = tsd.create_distill_loss('sa', student_channels=channels, teacher_channels=channels, **options)
        assert not loss.head_maps and len(loss.connectors) == len(channels)
        s = [torch.randn(2, c, 8, 8) for c in channels]
        t = [torch.randn(2, c, 8, 8) for c in channels]
        out = loss(s, t, torch.randn(2, 5), torch.randn(2, 5))
        assert set(out) == {'sa_dist', 'sa_att', 'sa_kd'} and all(torch.isfinite(v) for v in out.values())
        assert loss.option_values['cam_weight'] == options.get('cam_weight', 1.0)  # what was asked for


def test_head_maps_needs_the_cam_term_and_the_bound_heads():
    with pytest.raises(tsd.UsageError, match='head_maps=True reserves the last pair for the CAM term, but cam_weight=0'):
        tsd.create_distill_loss('sa', student_channels=[8, 16], teacher_channels=[8, 16], cam_weight=0, head_maps=True)
    loss = tsd.create_distill_loss('sa', student_channels=[8, 16], teacher_channels=[8, 16], head_maps=True)
    assert len(loss.connectors) == 1 and 'head_maps' not in loss.option_values  # filled in, not an option
    s = [torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4)]
    with pytest.raises(tsd.UsageError, match=r'call loss.bind\(student, teacher\) before the forward'):
        loss(s, s, torch.randn(2, 5), torch.randn(2, 5))


def test_a_task_given_a_loss_built_on_its_own_distils_its_pairs_and_says_the_cam_term_is_off():
    student, teacher = _models()
    loss = tsd.create_distill_loss('sa', student_channels=[192], teacher_channels=[256])
    task = tsd.DistillTask(student, teacher, loss=loss, student_stages=['layer3'], teacher_stages=['layer3'],
                           img_size=64, verbose=False)
    assert [s.name for s in task.student_stages] == ['layer3']  # no head-map pair appended for it
    assert len(task.notices) == 1 and 'built without the maps the heads take (head_maps=False)' in task.notices[0]
    out = task(torch.randn(2, 3, 64, 64), torch.tensor([0, 4]))
    assert 'sa_cam' not in out and torch.isfinite(out['loss'])
