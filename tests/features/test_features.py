"""Stage taps and pairing across timm families."""
import pytest
import timm
import torch
import torch.nn as nn
from timm.utils.model_ema import ModelEmaV3

import timm_sadistill as tsd
from timm_sadistill import FeatureTaps, list_stages, pair_stages


@pytest.fixture(scope='module')
def resnet():
    torch.manual_seed(0)
    return timm.create_model('test_resnet', num_classes=5).eval()


@pytest.fixture(scope='module')
def vit():
    torch.manual_seed(0)
    return timm.create_model('test_vit', num_classes=5, img_size=64).eval()


def test_list_stages_reads_feature_info(resnet):
    stages = list_stages(resnet)
    assert [s.name for s in stages] == ['act1', 'layer1', 'layer2', 'layer3', 'layer4']
    assert [s.index for s in stages] == [0, 1, 2, 3, 4]
    assert [s.reduction for s in stages] == [2, 4, 8, 16, 32]
    assert [s.channels for s in stages] == [f['num_chs'] for f in resnet.feature_info]


def test_names_indices_and_negative_indices_select_the_same_stages(resnet):
    x = torch.randn(2, 3, 64, 64)
    by_name = FeatureTaps(resnet, ['layer3', 'layer4'])
    by_index = FeatureTaps(resnet, [3, 4])
    by_negative = FeatureTaps(resnet, [-2, -1])
    assert by_name.stages == by_index.stages == by_negative.stages
    assert by_name.channels == [192, 96] and by_name.reductions == [16, 32]
    logits, feats = by_name(x)
    torch.testing.assert_close(logits, resnet(x))
    assert [tuple(f.shape) for f in feats] == [(2, 192, 4, 4), (2, 96, 2, 2)]
    for a, b in zip(feats, by_negative(x)[1]):
        torch.testing.assert_close(a, b)


def test_hooked_submodule_path_and_feature_info_stage_agree(resnet):
    x = torch.randn(2, 3, 64, 64)
    taps = FeatureTaps(resnet, ['layer2', 'layer3.0.conv1'], img_size=64)
    assert taps.use_hooks
    assert taps.stages[1].index is None and taps.stages[1].reduction == 8  # conv1 of layer3 runs before the stride
    logits, (layer2_hooked, conv) = taps(x)
    _, (layer2,) = FeatureTaps(resnet, ['layer2'])(x)
    assert not FeatureTaps(resnet, ['layer2']).use_hooks
    torch.testing.assert_close(layer2_hooked, layer2)
    torch.testing.assert_close(logits, resnet(x))
    assert conv.shape[1] == taps.stages[1].channels
    # hooks live only during the call: copies (EMA) never carry them
    assert all(not m._forward_hooks for m in resnet.modules())
    # and through a task, which hands its taps the resolved stages (a path's StageInfo has no feature_info index)
    task = tsd.create_distill_task('sa', resnet, timm.create_model('resnet18', num_classes=5), img_size=64,
                                   student_stages=['layer3.0.conv2'], teacher_stages=['layer3.1.conv2'], verbose=False)
    # the named stage, then the CAM term's pair: the maps the heads take
    assert [s.name for s in task.student_stages] == ['layer3.0.conv2', 'layer4'] and task.student_stages[0].index is None
    out = task(x, torch.tensor([0, 4]))
    assert torch.isfinite(out['loss']) and out['sa_att'] > 0


def test_vit_tokens_become_grids_without_prefix_tokens(vit):
    x = torch.randn(2, 3, 64, 64)
    taps = FeatureTaps(vit, ['blocks.5'])
    _, (grid,) = taps(x)
    assert grid.shape == (2, 64, 4, 4)
    hooked = FeatureTaps(vit, ['blocks.5', 'blocks.5.mlp'], img_size=64)
    _, (block_hooked, mlp) = hooked(x)
    torch.testing.assert_close(block_hooked, grid)
    assert mlp.shape == (2, 64, 4, 4) and hooked.stages[1].reduction == 16
    # the grid is the tokens after the prefix (cls) token, row-major
    tokens = {}
    handle = vit.blocks[5].register_forward_hook(lambda m, i, o: tokens.setdefault('out', o))
    vit(x)
    handle.remove()
    torch.testing.assert_close(grid[:, :, 1, 2], tokens['out'][:, vit.num_prefix_tokens + 1 * 4 + 2])


def test_auto_takes_deepest_stage_per_reduction_with_maps_of_4x4_and_up(resnet, vit):
    assert FeatureTaps(resnet, 'auto', img_size=64).names == ['layer1', 'layer2', 'layer3']
    assert FeatureTaps(resnet, 'auto', img_size=160).names == ['layer1', 'layer2', 'layer3', 'layer4']
    assert FeatureTaps(vit, 'auto', img_size=64).names == ['blocks.5']


def test_wrapped_models_are_unwrapped(resnet):
    x = torch.randn(2, 3, 64, 64)
    expected = FeatureTaps(resnet, ['layer2'])(x)
    ema = ModelEmaV3(resnet)
    compiled = torch.compile(resnet, backend='eager')
    for wrapped in (ema, compiled):
        assert list_stages(wrapped) == list_stages(resnet)
        logits, feats = FeatureTaps(wrapped, ['layer2'])(x)
        torch.testing.assert_close(feats[0], expected[1][0])


def test_ddp_wrapped_model_runs_through_the_wrapper(resnet):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    created = not dist.is_initialized()
    if created:
        dist.init_process_group('gloo', init_method='tcp://127.0.0.1:29533', rank=0, world_size=1)
    try:
        model = timm.create_model('test_resnet', num_classes=5)
        ddp = DDP(model)
        taps = FeatureTaps(ddp, ['layer2', 'layer3'])
        assert taps.use_hooks  # DDP's own forward must run so gradients are reduced
        logits, feats = taps(torch.randn(2, 3, 64, 64))
        (logits.sum() + sum(f.sum() for f in feats)).backward()
        assert model.layer1[0].conv1.weight.grad is not None
    finally:
        if created:
            dist.destroy_process_group()


def test_unknown_stage_lists_the_valid_ones(resnet):
    with pytest.raises(ValueError, match=r"Unknown stage 'layer9'.*'act1' \(0\).*'layer4' \(4\)"):
        FeatureTaps(resnet, ['layer9'])
    with pytest.raises(ValueError, match=r"Stage index 7 is out of range.*'layer1' \(1\)"):
        FeatureTaps(resnet, [7])
    with pytest.raises(tsd.UsageError, match='name .* or an index'):
        FeatureTaps(resnet, [1.5])


def test_model_without_stages_says_what_to_pass():
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    with pytest.raises(ValueError, match='no stage with a map'):
        FeatureTaps(plain, 'auto', img_size=32)
    with pytest.raises(ValueError, match='no feature_info: pass submodule paths'):
        FeatureTaps(plain, ['layer3'], img_size=32)


def test_auto_pairing_across_architectures(resnet, vit):
    teacher = timm.create_model('resnet18', num_classes=5)
    s, t = pair_stages(vit, teacher, img_size=64)
    assert [x.name for x in s] == ['blocks.5'] and [x.name for x in t] == ['layer3']
    s, t = pair_stages(resnet, teacher, img_size=64)
    assert [x.name for x in s] == [x.name for x in t] == ['layer1', 'layer2', 'layer3']
    s, t = pair_stages(resnet, teacher, img_size=64, policy='middle')
    assert [x.name for x in s] == ['layer2']
    s, t = pair_stages(resnet, teacher, img_size=64, policy='last')
    assert [x.name for x in t] == ['layer3']
    s, t = pair_stages(resnet, teacher, student_stages=['layer3'], img_size=64)
    assert [x.name for x in t] == ['layer3']


def test_pairing_errors_say_what_to_pass(resnet):
    teacher = timm.create_model('resnet18', num_classes=5)
    with pytest.raises(ValueError, match='equal length'):
        pair_stages(resnet, teacher, ['layer2', 'layer3'], ['layer3'], img_size=64)
    with pytest.raises(ValueError, match='at least 4x4 at input size .*larger img_size'):
        pair_stages(resnet, teacher, img_size=8)
    with pytest.raises(ValueError, match='logits only'):
        pair_stages(resnet, teacher, ['layer2'], policy='none')


FAMILIES = [
    ('test_resnet', {}),
    ('test_convnext', {}),
    ('test_efficientnet', {}),
    ('mobilenetv3_small_050', {}),
    ('regnetx_002', {}),
    ('test_vit', {'img_size': 64}),
    ('deit_tiny_patch16_224', {'img_size': 64}),
    ('swin_tiny_patch4_window7_224', {'img_size': 64}),
]


@pytest.mark.parametrize('name,kwargs', FAMILIES, ids=[f[0] for f in FAMILIES])
def test_any_timm_backbone_lists_pairs_and_trains_with_sa(name, kwargs):
    torch.manual_seed(0)
    student = timm.create_model(name, num_classes=4, **kwargs)
    teacher = timm.create_model('resnet18', num_classes=4)
    stages = list_stages(student)
    assert stages and all(s.channels > 0 and s.reduction >= 1 for s in stages)
    task = tsd.create_distill_task('sa', student, teacher, img_size=64, verbose=False)
    assert task.student_stages and len(task.student_stages) == len(task.teacher_stages)
    assert all(s.reduction == t.reduction for s, t in zip(task.student_stages, task.teacher_stages))
    opt = torch.optim.SGD(task.trainable_module.parameters(), lr=0.01)
    task.train()
    out = task(torch.randn(2, 3, 64, 64), torch.tensor([0, 3]))
    assert torch.isfinite(out['loss']) and out['sa_dist'] > 0 and out['sa_att'] > 0
    out['loss'].backward()
    connector_grads = [p.grad for p in task.distill_loss.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in connector_grads)
    opt.step()
