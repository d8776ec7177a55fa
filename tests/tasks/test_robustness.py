"""Half precision, non-finite features and determinism of the library's tasks."""
import pytest
import timm
import torch

import timm_sadistill as tsd
from conftest import train_steps

METHODS = tsd.list_distill_losses()  # every registered method


@pytest.mark.parametrize('amp_dtype', [
    pytest.param(torch.bfloat16, id='bf16'),
    pytest.param(torch.float16, id='fp16', marks=pytest.mark.slow),  # fp16 on the CPU: several seconds a method
])
@pytest.mark.parametrize('method', METHODS)
def test_autocast_training_is_finite(method, amp_dtype, pattern_data):
    images, labels = pattern_data
    torch.manual_seed(0)
    student = timm.create_model('test_resnet', num_classes=4)
    teacher = timm.create_model('test_convnext', num_classes=4)
    task = tsd.create_distill_task(method, student, teacher, img_size=64, verbose=False)
    optimizer = torch.optim.AdamW(task.trainable_module.parameters(), lr=1e-3)
    task.train()
    for step in range(3):
        x, y = images[step * 8:(step + 1) * 8], labels[step * 8:(step + 1) * 8]
        with torch.autocast('cpu', dtype=amp_dtype):
            out = task(x, y)
        assert all(torch.isfinite(v).all() for k, v in out.items()), {k: v for k, v in out.items() if k != 'output'}
        assert out['kd_loss'].dtype == torch.float32
        optimizer.zero_grad()
        out['loss'].backward()
        assert all(torch.isfinite(p.grad).all() for p in task.trainable_module.parameters() if p.grad is not None)
        optimizer.step()


def _poisoned_task(**options):
    torch.manual_seed(0)
    student = timm.create_model('test_resnet', num_classes=4)
    teacher = timm.create_model('resnet18', num_classes=4)
    task = tsd.create_distill_task('sa', student, teacher, img_size=64, verbose=False, **options)
    # an inf in the teacher's layer2 output: what an fp16 overflow looks like
    teacher.layer2.register_forward_hook(lambda m, i, o: o.index_fill(1, torch.tensor([0]), float('inf')))
    return task


def test_nonfinite_teacher_stage_is_named(pattern_data):
    images, labels = pattern_data
    task = _poisoned_task()
    x, y = images[:4], labels[:4]
    out = task(x, y)
    with pytest.raises(tsd.NonFiniteLossError, match=r"teacher stage 'layer2' \(4, 128, 8, 8\): .*inf.*--skip-nonfinite"):
        tsd.guard_finite_loss(task, out, x, y)


def test_diagnosis_leaves_student_and_connectors_exactly_as_they_were(pattern_data):
    images, labels = pattern_data
    task = _poisoned_task(warmup_steps=10)  # the warm-up's step count is one more buffer a forward moves
    task.train()  # BatchNorm in train mode: a forward updates its running statistics
    x, y = images[:4], labels[:4]
    out = task(x, y)
    before = {k: v.clone() for k, v in task.trainable_module.state_dict().items()}  # student and connectors
    with pytest.raises(tsd.NonFiniteLossError, match=r"teacher stage 'layer2'"):
        tsd.guard_finite_loss(task, out, x, y)
    after = task.trainable_module.state_dict()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    task(x, y)  # the comparison can see a change: one more forward moves the statistics
    after = task.trainable_module.state_dict()
    assert any('running_mean' in k and not torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(before['distill_loss.steps'], after['distill_loss.steps'])


def test_nonfinite_step_is_skipped_with_a_warning(pattern_data, caplog):
    images, labels = pattern_data
    task = _poisoned_task()
    x, y = images[:4], labels[:4]
    with caplog.at_level('WARNING'):
        assert tsd.guard_finite_loss(task, task(x, y), x, y, skip=True) is False
    assert "teacher stage 'layer2'" in caplog.text and 'Skipping this step' in caplog.text


def test_guard_names_the_step_and_decides_over_all_ranks(pattern_data, caplog):
    import torch.distributed as dist
    images, labels = pattern_data
    task = _poisoned_task()
    x, y = images[:4], labels[:4]
    created = not dist.is_initialized()
    if created:
        dist.init_process_group('gloo', init_method='tcp://127.0.0.1:29535', rank=0, world_size=1)
    try:
        with pytest.raises(tsd.NonFiniteLossError, match=r"Non-finite loss at epoch 2, batch 5: .*teacher stage"):
            tsd.guard_finite_loss(task, task(x, y), x, y, where='epoch 2, batch 5', all_ranks=True)
        with caplog.at_level('WARNING'):
            assert not tsd.guard_finite_loss(task, task(x, y), x, y, skip=True, where='epoch 2, batch 5', all_ranks=True)
        assert 'Skipping step at epoch 2, batch 5' in caplog.text
    finally:
        if created:
            dist.destroy_process_group()


def test_finite_loss_passes_the_guard_without_diagnosis(pattern_data, monkeypatch):
    images, labels = pattern_data
    task = tsd.create_distill_task('kd', timm.create_model('test_resnet', num_classes=4),
                                   timm.create_model('resnet18', num_classes=4), verbose=False)
    monkeypatch.setattr(tsd.tasks.nonfinite, 'diagnose_nonfinite', lambda *a: pytest.fail('diagnosed a finite loss'))
    assert tsd.guard_finite_loss(task, task(images[:4], labels[:4]), images[:4], labels[:4])


@pytest.mark.slow
def test_same_seed_same_losses(pattern_data):
    images, labels = pattern_data

    def run():
        torch.manual_seed(123)
        task = tsd.create_distill_task('sa', timm.create_model('test_resnet', num_classes=4),
                                       timm.create_model('resnet18', num_classes=4), img_size=64, verbose=False)
        return train_steps(task, images, labels, steps=3)

    assert run() == run()
