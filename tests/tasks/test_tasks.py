"""Distillation tasks: real short training runs, a frozen teacher, state, EMA, compile and DDP."""

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.task import TrainingTask

import timm_sadistill as tsd
from conftest import train_steps

METHODS = tsd.list_distill_losses()  # every registered method
PAIRS = {
    'homogeneous': ('resnet18', 'test_resnet'),
    'heterogeneous': ('test_convnext', 'mobilenetv3_small_050'),
}


def _state_copy(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize('pair', list(PAIRS))
@pytest.mark.parametrize('method', METHODS)
def test_short_training_run_lowers_the_loss_and_keeps_the_teacher(method, pair, pattern_data, trained_teachers):
    images, labels = pattern_data
    teacher_name, student_name = PAIRS[pair]
    teacher = trained_teachers[teacher_name]
    before = _state_copy(teacher)
    torch.manual_seed(0)
    student = timm.create_model(student_name, num_classes=4)
    task = tsd.create_distill_task(method, student, teacher, img_size=64, verbose=False)
    assert isinstance(task, TrainingTask)
    history = train_steps(task, images, labels, steps=20)
    first, last = history[:5], history[-5:]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    assert mean(last, 'loss') < mean(first, 'loss'), history
    assert mean(last, 'kd_loss') < mean(first, 'kd_loss'), [r['kd_loss'] for r in history]
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), 'teacher parameters or buffers changed'
    assert not teacher.training


def test_result_holds_every_term_and_the_weighted_sum(pattern_data):
    images, labels = pattern_data
    torch.manual_seed(0)
    student = timm.create_model('test_resnet', num_classes=4)
    teacher = timm.create_model('resnet18', num_classes=4)
    task = tsd.SADistillTask(student, teacher, img_size=64, distill_loss_weight=0.5, task_loss_weight=2.0, verbose=False)
    out = task(images[:4], labels[:4])
    assert set(out) == {'loss', 'output', 'task_loss', 'kd_loss', 'sa_dist', 'sa_att', 'sa_kd', 'sa_cam', 'teacher_top1'}
    with torch.no_grad():
        right = (teacher(images[:4]).argmax(-1) == labels[:4]).float().mean() * 100
    torch.testing.assert_close(out['teacher_top1'], right)  # not a term: outside kd_loss
    torch.testing.assert_close(out['kd_loss'], out['sa_dist'] + out['sa_att'] + out['sa_kd'] + out['sa_cam'])
    torch.testing.assert_close(out['loss'], 2.0 * out['task_loss'] + 0.5 * out['kd_loss'])
    assert out['output'].shape == (4, 4)


@pytest.mark.parametrize('distill,task_w,expected', [
    (None, None, (1.0, 1.0)), (0.3, None, (1.0, 0.3)), (None, 0.3, (0.3, 0.7)), (2.0, 0.5, (0.5, 2.0)),
])
def test_loss_weights_follow_timm_rules(distill, task_w, expected):
    assert tsd.tasks.resolve_loss_weights(distill, task_w) == expected


def test_sa_task_options_reach_the_loss():
    student = timm.create_model('test_resnet', num_classes=4)
    teacher = timm.create_model('resnet18', num_classes=4)
    task = tsd.SADistillTask(student, teacher, img_size=64, tau=2.0, p=1.0, alpha=0.5, beta=3.0, kd_weight=0.0,
                             temperature=3.0, connector='conv1x1', student_stages=['layer3'], verbose=False)
    loss = task.distill_loss
    assert (loss.tau, loss.p, loss.alpha, loss.beta, loss.kd_weight, loss.temperature) == (2.0, 1.0, 0.5, 3.0, 0.0, 3.0)
    # the stages asked for, then the CAM term's pair (the maps the heads take), which has no connector
    assert [s.name for s in task.teacher_stages] == ['layer3', 'layer4'] and loss.head_maps
    assert len(loss.connectors) == 1
    assert isinstance(loss.connectors[0][0], torch.nn.Conv2d) and len(loss.connectors[0]) == 2
    defaults = tsd.create_distill_task('sa', student, teacher, img_size=64, verbose=False).distill_loss
    assert (defaults.tau, defaults.beta, defaults.kd_weight) == (4.0, 10.0, 1.0)


def test_optimizer_from_trainable_module_trains_student_and_connectors(pattern_data):
    images, labels = pattern_data
    student = timm.create_model('test_resnet', num_classes=4)
    teacher = timm.create_model('resnet18', num_classes=4)
    task = tsd.create_distill_task('sa', student, teacher, img_size=64, verbose=False)
    assert task.get_eval_model() is student
    connector = task.distill_loss.connectors[0][0].weight
    first_student = next(student.parameters())
    trainable_ids = {id(p) for p in task.trainable_module.parameters()}
    assert id(connector) in trainable_ids and id(first_student) in trainable_ids
    assert not any(id(p) in trainable_ids for p in teacher.parameters())
    c0, s0 = connector.detach().clone(), first_student.detach().clone()
    train_steps(task, images, labels, steps=2)
    assert not torch.equal(c0, connector) and not torch.equal(s0, first_student)


def test_teacher_stays_frozen_in_train_mode():
    student = timm.create_model('test_resnet', num_classes=4)
    teacher = timm.create_model('resnet18', num_classes=4)
    task = tsd.create_distill_task('at', student, teacher, img_size=64, verbose=False)
    task.train()
    assert student.training and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())


def test_connectors_round_trip_through_task_state(pattern_data):
    images, labels = pattern_data
    teacher = timm.create_model('resnet18', num_classes=4)
    task = tsd.create_distill_task('sa', timm.create_model('test_resnet', num_classes=4), teacher, img_size=64, verbose=False)
    train_steps(task, images, labels, steps=2)
    state = task.get_task_state()
    assert set(state) == {'distill_loss'} and any('connectors' in k for k in state['distill_loss'])
    fresh = tsd.create_distill_task('sa', timm.create_model('test_resnet', num_classes=4), teacher, img_size=64, verbose=False)
    fresh.load_task_state(state)
    for k, v in task.distill_loss.state_dict().items():
        assert torch.equal(v, fresh.distill_loss.state_dict()[k])
    with pytest.raises(RuntimeError, match='no connector state'):
        fresh.load_task_state({})
    # timm's checkpoint helpers see the student and the connectors
    ckpt = task.get_checkpoint_state()
    assert set(ckpt) == {'state_dict', 'task_state'} and 'fc.weight' in ckpt['state_dict']


def test_ema_copies_student_and_connectors(pattern_data):
    images, labels = pattern_data
    student = timm.create_model('test_resnet', num_classes=4)
    task = tsd.create_distill_task('sa', student, timm.create_model('resnet18', num_classes=4), img_size=64, verbose=False)
    task.setup_ema(decay=0.5)
    train_steps(task, images, labels, steps=2)
    task.update_ema()
    ema_student = task.get_eval_model(ema=True)
    assert type(ema_student) is type(student) and ema_student is not student
    assert not torch.equal(next(ema_student.parameters()), next(student.parameters()))
    assert set(task.get_task_state(ema=True)) == {'distill_loss'}
    assert not any(m._forward_hooks for m in ema_student.modules())


@pytest.mark.slow
def test_compile_keeps_the_task_working(pattern_data):
    images, labels = pattern_data
    x, y = images[:4], labels[:4]

    def sa_task():  # the same seed twice: two identical tasks, one to compile and one eager reference
        torch.manual_seed(0)
        return tsd.create_distill_task('sa', timm.create_model('test_resnet', num_classes=4),
                                       timm.create_model('resnet18', num_classes=4), img_size=64, verbose=False)

    task, reference = sa_task(), sa_task()
    graphs = []

    def recording_backend(graph_module, example_inputs):  # runs what dynamo captured, eagerly, and counts it
        graphs.append(graph_module)
        return graph_module.forward

    eval_model = task.compile(backend=recording_backend)
    out, expected = task(x, y), reference(x, y)
    assert len(graphs) >= 2, 'the teacher taps and the trainable module went through torch.compile'
    for key in expected:
        torch.testing.assert_close(out[key], expected[key], msg=key)
    out['loss'].backward()
    expected['loss'].backward()
    student, reference_student = task.get_eval_model(), reference.get_eval_model()
    for (name, p), q in zip(student.named_parameters(), reference_student.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    compiled_graphs = len(graphs)
    eval_model.eval()
    reference_student.eval()
    torch.testing.assert_close(eval_model(images[:2]), reference_student(images[:2]))
    assert len(graphs) > compiled_graphs, 'the eval model is compiled too'
    assert set(task.get_task_state()) == {'distill_loss'}


def test_prepare_distributed_wraps_student_and_connectors_only(pattern_data):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    images, labels = pattern_data
    created = not dist.is_initialized()
    if created:
        dist.init_process_group('gloo', init_method='tcp://127.0.0.1:29534', rank=0, world_size=1)
    try:
        student = timm.create_model('test_resnet', num_classes=4)
        task = tsd.create_distill_task('fitnet', student, timm.create_model('resnet18', num_classes=4), img_size=64, verbose=False)
        task.prepare_distributed()
        assert isinstance(task.trainable_module, DDP) and not isinstance(task.teacher.model, DDP)
        assert task.get_eval_model() is student
        train_steps(task, images, labels, steps=1)
        assert set(task.get_task_state()) == {'distill_loss'}
    finally:
        if created:
            dist.destroy_process_group()


def test_teacher_input_is_renormalised_when_mean_std_differ():
    student = timm.create_model('test_resnet', num_classes=4)
    student.pretrained_cfg = {**student.pretrained_cfg, 'mean': (0.5, 0.5, 0.5), 'std': (0.5, 0.5, 0.5)}
    teacher = timm.create_model('resnet18', num_classes=4)
    task = tsd.create_distill_task('kd', student, teacher, img_size=64, verbose=False)
    seen = {}
    handle = teacher.conv1.register_forward_pre_hook(lambda m, args: seen.setdefault('x', args[0]))
    x = torch.randn(2, 3, 64, 64)
    task(x, torch.tensor([0, 1]))
    handle.remove()
    mean = torch.tensor(teacher.pretrained_cfg['mean']).view(1, 3, 1, 1)
    std = torch.tensor(teacher.pretrained_cfg['std']).view(1, 3, 1, 1)
    torch.testing.assert_close(seen['x'], (x * 0.5 + 0.5 - mean) / std)


def test_teacher_input_is_renormalised_from_the_statistics_the_input_was_normalised_with():
    """A loader with its own --mean/--std: the teacher's input is undone with those, not the student's cfg."""
    student = timm.create_model('test_resnet', num_classes=4)
    teacher = timm.create_model('resnet18', num_classes=4)
    task = tsd.create_distill_task('kd', student, teacher, img_size=64, input_mean=(0.2, 0.3, 0.4),
                                   input_std=(0.1, 0.2, 0.3), verbose=False)
    x = torch.randn(2, 3, 64, 64)
    mean = torch.tensor(teacher.pretrained_cfg['mean']).view(1, 3, 1, 1)
    std = torch.tensor(teacher.pretrained_cfg['std']).view(1, 3, 1, 1)
    pixels = x * torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1) + torch.tensor([0.2, 0.3, 0.4]).view(1, 3, 1, 1)
    torch.testing.assert_close(task.teacher_input(x), (pixels - mean) / std)
    same = tsd.create_distill_task('kd', student, teacher, img_size=64, input_mean=teacher.pretrained_cfg['mean'],
                                   input_std=teacher.pretrained_cfg['std'], verbose=False)
    assert same.teacher_input(x) is x  # the input already has the teacher's statistics: nothing to undo


def test_teacher_by_name_loads_its_checkpoint_and_never_the_hub(tmp_path, monkeypatch):
    import timm.models._builder as builder
    monkeypatch.setattr(builder, 'load_state_dict_from_hf', lambda *a, **k: pytest.fail('contacted the hub'))
    source = timm.create_model('resnet18', num_classes=4)
    path = tmp_path / 'teacher.safetensors'
    save_file(source.state_dict(), str(path))
    student = timm.create_model('test_resnet', num_classes=4)
    task = tsd.create_distill_task('sa', student, 'resnet18', teacher_pretrained_path=str(path), img_size=64, verbose=False)
    loaded = task.teacher.model.state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in source.state_dict().items())
    with pytest.raises(ValueError, match='teacher_pretrained_path=<checkpoint>.*teacher_pretrained=True'):
        tsd.create_distill_task('sa', student, 'resnet18', img_size=64)
    with pytest.raises(tsd.UsageError, match='does not exist'):
        tsd.create_distill_task('sa', student, 'resnet18', teacher_pretrained_path=str(tmp_path / 'nope.safetensors'))
    wrong = timm.create_model('resnet18', num_classes=7)
    save_file(wrong.state_dict(), str(tmp_path / 'wrong.safetensors'))
    with pytest.raises(ValueError, match='does not fit .resnet18. with 4 classes'):
        tsd.create_distill_task('sa', student, 'resnet18', teacher_pretrained_path=str(tmp_path / 'wrong.safetensors'))


def test_unknown_method_and_options_are_clear_errors():
    student = timm.create_model('test_resnet', num_classes=4)
    teacher = timm.create_model('resnet18', num_classes=4)
    with pytest.raises(tsd.UsageError, match="Unknown distillation loss 'sax'; registered: at, cwd, dist, dkd, fitnet, kd, lskd, sa"):
        tsd.create_distill_task('sax', student, teacher)
    with pytest.raises(tsd.UsageError, match="'cwd' takes no option 'tua'; it takes student_channels, teacher_channels, tau"):
        tsd.create_distill_task('cwd', student, teacher, img_size=64, tua=2.0)
    with pytest.raises(tsd.UsageError, match="'sa' takes no option 'tua'; it takes .*tau, p, alpha, beta"):
        tsd.create_distill_task('sa', student, teacher, img_size=64, tua=2.0)
    with pytest.raises(ValueError, match='logits only'):
        tsd.create_distill_task('kd', student, teacher, student_stages=['layer2'])
