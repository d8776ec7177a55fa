"""SA builds and trains on every family, with its defaults and with the class-activation-map term: where a head takes
a map (the last feature_info map, or forward_features' output: after a conv or a final layer, or channels-last) the
CAM is computed on it; where a head takes tokens the term is off for the pair, with one notice, and the loss is SA's
with cam_weight 0."""
import logging

import pytest
import timm
import torch

import timm_sadistill as tsd
from timm_sadistill.features import HEAD_INPUT, head_map_stage

IMG = 64
# family -> (timm name, create_model keywords: the smallest build that takes IMG px, whether its head takes a map)
FAMILIES = {
    'vit': ('test_vit', {}, False),
    'efficientnet': ('test_efficientnet', {}, True),
    'ghostnet': ('ghostnet_050', {}, True),
    'rexnet': ('rexnet_100', {}, True),
    'hrnet': ('hrnet_w18_small', {}, True),
    'fastvit': ('fastvit_t8', {}, True),
    'swin': ('swin_tiny_patch4_window7_224',
             dict(img_size=IMG, window_size=2, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)), True),
    'twins': ('twins_svt_small',
              dict(img_size=IMG, embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1),
                   wss=(2, 2, 2, 2)), False),
    'levit': ('levit_128s', dict(img_size=IMG, embed_dim=(32, 48, 64), depth=(1, 1, 1), num_heads=(1, 1, 1), key_dim=8),
              False),
    'mambaout': ('test_mambaout', {}, True),
}
CAM = dict(cam_weight=1.0, connector='conv1x1')


def _model(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=5, **kwargs)


@pytest.fixture(scope='module')
def resnet18():
    """The teacher of the family students; frozen by each task, so one serves them all."""
    return _model('resnet18')


def _train_one_step(task):
    """One real step (forward, loss, backward, AdamW step); -> the result dict of the step."""
    student = task.get_eval_model()
    before = [p.detach().clone() for p in student.parameters()]
    optimizer = torch.optim.AdamW(task.trainable_module.parameters(), lr=1e-3)
    task.train()
    torch.manual_seed(1)
    out = task(torch.randn(2, 3, IMG, IMG), torch.tensor([0, 3]))
    optimizer.zero_grad()
    out['loss'].backward()
    optimizer.step()
    assert torch.isfinite(out['loss'])
    assert any(not torch.equal(b, p) for b, p in zip(before, student.parameters())), 'the student did not train'
    return out



def _cam_notices(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and 'cam_weight' in r.getMessage()]


@pytest.mark.parametrize('role', ['student', 'teacher'])
@pytest.mark.parametrize('family', list(FAMILIES))
def test_sa_trains_every_family_with_its_defaults_and_with_the_cam_term(family, role, resnet18, caplog):
    name, kwargs, takes_maps = FAMILIES[family]
    default_cam = tsd.loss_options('sa').defaults['cam_weight']
    for options in ({}, CAM):
        cam_asked = options.get('cam_weight', default_cam) > 0
        caplog.clear()
        member = _model(name, **kwargs)
        student, teacher = (member, resnet18) if role == 'student' else (_model('test_resnet'), member)
        with caplog.at_level(logging.WARNING):
            task = tsd.create_distill_task('sa', student, teacher, img_size=IMG, **options)
        out = _train_one_step(task)
        notices = _cam_notices(caplog)
        if cam_asked and takes_maps:  # computed on the map the head takes: here the head's input
            assert torch.isfinite(out['sa_cam']) and not notices and not task.notices
            family_stages = task.student_stages if role == 'student' else task.teacher_stages
            assert family_stages[-1].name == HEAD_INPUT
            assert task.distill_loss.option_values['cam_weight'] == options.get('cam_weight', default_cam)
        elif cam_asked:  # off for the pair: one line naming the model, why, and how to silence it
            assert 'sa_cam' not in out
            assert len(notices) == 1 and task.notices == notices, notices
            assert f"{role}'s head ({type(member).__name__} '{name}')" in notices[0] and 'token head' in notices[0]
            assert 'set cam_weight=0' in notices[0] and '\n' not in notices[0]
            assert task.distill_loss.option_values['cam_weight'] == 0.0  # the records say what the loss computes
            # SA with cam_weight 0: every pair feeds the spatial terms through its own connector, the same terms
            torch.manual_seed(2)
            off = tsd.create_distill_task('sa', student, teacher, img_size=IMG, verbose=False, **{**options, 'cam_weight': 0})
            torch.manual_seed(2)
            again = tsd.create_distill_task('sa', student, teacher, img_size=IMG, verbose=False, **options)
            assert [s.name for s in again.student_stages] == [s.name for s in off.student_stages]
            assert len(again.distill_loss.connectors) == len(again.student_stages)
            off.eval()
            again.eval()
            x, y = torch.randn(2, 3, IMG, IMG), torch.tensor([1, 2])
            with torch.no_grad():
                expected, got = off(x, y), again(x, y)
            assert got.keys() == expected.keys()
            for key in ('loss', 'sa_dist', 'sa_att'):
                torch.testing.assert_close(got[key], expected[key])
        else:
            assert 'sa_cam' not in out and not notices and not task.notices


def test_a_plain_cnn_pair_computes_the_cam_on_its_last_feature_info_maps(resnet18):
    task = tsd.create_distill_task('sa', _model('test_resnet'), resnet18, img_size=IMG, verbose=False, **CAM)
    assert task.student_stages[-1].name == 'layer4' and task.teacher_stages[-1].name == 'layer4'
    out = _train_one_step(task)
    assert torch.isfinite(out['sa_cam']) and not task.notices


def test_a_built_loss_with_the_cam_term_on_a_token_head_is_refused_with_the_fix():
    """A loss built beforehand has its connectors for the pairs it was given: the task cannot turn its CAM off."""
    loss = tsd.create_distill_loss('sa', student_channels=[64, 64], teacher_channels=[48, 96], head_maps=True, **CAM)
    with pytest.raises(tsd.UsageError, match=r"was built to distil the maps the heads take \(head_maps=True\), but the "
                                             r"student's head \(VisionTransformer 'test_vit'\) .* build it with "
                                             r"head_maps=False and cam_weight=0.0, or pass"):
        tsd.DistillTask(_model('test_vit'), _model('test_resnet'), loss=loss, img_size=IMG, verbose=False)


@pytest.mark.parametrize('name,submodule', [('test_efficientnet', 'blocks.1.0'), ('test_mambaout', 'stages.1.blocks')])
def test_the_head_input_is_forward_features_output_through_either_tap(name, submodule):
    """forward_intermediates' final output and the argument forward_head gets (the hooked path) are the same map,
    forward_features' (channels-last for MambaOut), handed over as NCHW."""
    model = _model(name).eval()
    stage = head_map_stage(model, (IMG, IMG))
    assert stage.name == HEAD_INPUT and stage.channels == model.num_features and stage.reduction == 32
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        expected = model.forward_features(x)
        expected = expected.permute(0, 3, 1, 2) if name == 'test_mambaout' else expected
        logits = model(x)
        by_index = tsd.FeatureTaps(model, [1, stage])
        hooked = tsd.FeatureTaps(model, [submodule, stage])
        alone = tsd.FeatureTaps(model, [stage])
        assert not by_index.use_hooks and hooked.use_hooks and alone.use_hooks
        for taps in (by_index, hooked, alone):
            got_logits, feats = taps(x)
            torch.testing.assert_close(feats[-1], expected)
            torch.testing.assert_close(got_logits, logits)
    assert 'forward_head' not in vars(model)  # the hooked path's catch lives for one call


@pytest.mark.slow
def test_a_run_with_the_cam_term_off_records_it_and_resumes(tmp_path):
    import yaml
    from safetensors.torch import save_file
    from test_user_errors import FLAGS, write_folder
    from timm_sadistill.cli import main

    write_folder(tmp_path / 'data')
    torch.manual_seed(0)
    save_file(timm.create_model('test_resnet', num_classes=3).state_dict(), str(tmp_path / 'teacher.safetensors'))
    # the student a ViT (a token head), at a size whose 16-px patches make a 4x4 map for auto to pair
    flags = [{'test_resnet': 'test_vit', '32': '64'}.get(f, f) for f in FLAGS]
    common = ['train', '--data-dir', str(tmp_path / 'data'), '--num-classes', '3', '--output', str(tmp_path / 'out'),
              '--experiment', 'vit', '--distill', 'sa', '--teacher', 'test_resnet', '--sa-cam-weight', '1',
              '--teacher-checkpoint', str(tmp_path / 'teacher.safetensors')] + flags
    assert main(common) == 0
    folder = tmp_path / 'out' / 'vit'
    recorded = yaml.safe_load((folder / 'args.yaml').read_text())
    assert recorded['sa_cam_weight'] == 1.0 and recorded['distill_options']['cam_weight'] == 0.0
    card = (folder / 'model' / 'README.md').read_text()
    assert '- **Notices:**' in card and "SA: cam_weight=1.0 is off for this pair: the student's head" in card
    assert main(common + ['--epochs', '2', '--resume', str(folder / 'last.pth.tar')]) == 0
