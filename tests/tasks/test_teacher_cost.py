"""A cheaper teacher: ``teacher_amp_dtype`` runs the frozen teacher alone under bf16/fp16 autocast with its outputs
back in float32 for the loss, ``compile_teacher`` compiles its forward alone; unset, nothing changes. The flags
(``--teacher-amp-dtype``, ``--teacher-compile``) reach the task through ``train`` and ``timm-train``."""
import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml

import timm_sadistill as tsd
from timm_sadistill.tasks.teacher_precision import resolve_teacher_amp_dtype

REPO_ROOT = Path(__file__).resolve().parents[2]
X, Y = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 3])


def _task(loss: str = 'sa', teacher: str = 'resnet18', **kwargs) -> tsd.DistillTask:
    torch.manual_seed(0)
    return tsd.create_distill_task(loss, timm.create_model('test_resnet', num_classes=4),
                                   timm.create_model(teacher, num_classes=4), img_size=32, verbose=False,
                                   **kwargs).train()


def _watch(task: tsd.DistillTask) -> dict:
    """Record the dtype of a convolution's output inside the teacher, and what the loss is handed."""
    seen = {}
    task.teacher.model.layer1.register_forward_hook(
        lambda module, args, output: seen.__setitem__('inside teacher', output.dtype))

    def loss_inputs(module, args):
        student_feats, teacher_feats, _, teacher_logits, _ = args
        seen['student feats'] = {f.dtype for f in student_feats}
        seen['teacher feats'] = {f.dtype for f in teacher_feats}
        seen['teacher logits'] = teacher_logits.dtype
        seen['teacher channels-last'] = all(f.is_contiguous(memory_format=torch.channels_last)
                                            for f in teacher_feats if f.dim() == 4)
    task.distill_loss.register_forward_pre_hook(loss_inputs)
    return seen


@pytest.mark.parametrize('amp_dtype', [torch.bfloat16, 'float16'])
def test_the_teacher_runs_in_the_autocast_dtype_and_the_loss_gets_float32(amp_dtype):
    task = _task(teacher_amp_dtype=amp_dtype)
    task.to(memory_format=torch.channels_last)  # the layout survives the cast back
    seen = _watch(task)
    out = task(X.contiguous(memory_format=torch.channels_last), Y)
    wanted = amp_dtype if isinstance(amp_dtype, torch.dtype) else getattr(torch, amp_dtype)
    assert seen['inside teacher'] == wanted
    assert seen['teacher feats'] == {torch.float32} and seen['teacher logits'] == torch.float32
    assert seen['teacher channels-last']
    assert seen['student feats'] == {torch.float32}  # the student is untouched
    assert all(v.dtype == torch.float32 for k, v in out.items() if k != 'output')
    out['loss'].backward()


def test_under_the_callers_autocast_the_student_keeps_it():
    task = _task(teacher_amp_dtype='float16')
    seen = _watch(task)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = task(X, Y)
    assert seen['inside teacher'] == torch.float16  # the teacher's own autocast, inside the caller's
    assert seen['teacher feats'] == {torch.float32}
    assert seen['student feats'] == {torch.bfloat16}
    out['loss'].backward()


def test_without_the_options_the_step_is_the_one_before_them():
    """The task's result is bit for bit the step as it was: the teacher's taps called directly, under the caller's
    autocast, their outputs handed to the loss as they are."""
    for autocast in (False, True):
        task = _task()
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            out = task(X, Y)
            with torch.no_grad():
                teacher_logits, teacher_feats = task.teacher_taps(task.teacher_input(X))
            logits, terms = task.trainable_module(X, teacher_feats, teacher_logits, Y)
            before = task.combine(logits, terms, Y)
            before['teacher_top1'] = (teacher_logits.argmax(-1) == Y).float().mean() * 100
        assert task.teacher_amp_dtype is None and not hasattr(task.teacher_taps, '_orig_mod')
        assert out.keys() == before.keys()
        for key in out:
            assert torch.equal(out[key], before[key]), key
        assert teacher_feats[0].dtype == (torch.bfloat16 if autocast else torch.float32)


def test_bad_values_are_refused_naming_the_option():
    for value, words in (('float64', "teacher_amp_dtype is 'float64'; pass bfloat16 or float16"),
                         (torch.float32, 'teacher_amp_dtype is torch.float32; pass bfloat16 or float16')):
        with pytest.raises(tsd.UsageError, match=words) as refused:
            _task('kd', 'test_resnet', teacher_amp_dtype=value)
        assert refused.value.option == 'teacher_amp_dtype'
    with pytest.raises(tsd.UsageError, match=r'teacher_amp_dtype=bfloat16 runs a float32 teacher under autocast, but '
                                             r'the task is built in float64'):
        tsd.create_distill_task('kd', timm.create_model('test_resnet', num_classes=4).double(), 'test_resnet',
                                img_size=32, verbose=False, dtype=torch.float64, teacher_amp_dtype='bfloat16')


def test_a_dtype_the_devices_autocast_cannot_run_is_refused_with_torchs_reason():
    with pytest.raises(tsd.UsageError) as refused:
        resolve_teacher_amp_dtype('bfloat16', torch.device('meta'), torch.float32)
    assert refused.value.option == 'teacher_amp_dtype'
    assert refused.value.worded('--teacher-amp-dtype', ' ').startswith(
        "--teacher-amp-dtype bfloat16: autocast on meta cannot run in bfloat16 (User specified an unsupported "
        "autocast device_type 'meta'); leave --teacher-amp-dtype unset.")
    assert resolve_teacher_amp_dtype('float16', torch.device('cpu'), torch.float32) == torch.float16


@pytest.mark.slow
def test_the_compiled_teacher_gives_the_eager_outputs():
    eager, compiled = _task('kd', 'test_resnet'), _task('kd', 'test_resnet', compile_teacher=True)
    assert hasattr(compiled.teacher_taps, '_orig_mod')  # the teacher's taps alone
    assert not hasattr(compiled.trainable_module, '_orig_mod')
    with torch.no_grad():
        want, got = eager.teacher_outputs(X), compiled.teacher_outputs(X)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled(X, Y)['loss'], eager(X, Y)['loss'], rtol=1e-4, atol=1e-5)
    compiled.compile()  # compiles the eager taps anew, not the compiled ones again
    assert type(compiled.teacher_taps._orig_mod).__name__ == 'FeatureTaps'


def test_the_flags_reach_the_task_keywords_and_a_resume_may_change_them():
    from timm_sadistill.cli.distill_flags import distill_task_kwargs
    from timm_sadistill.cli.timm_train import _build_parser
    from timm_sadistill.cli.train import parse_args
    from timm_sadistill.training.resume_checks import check_resume_matches
    args, args_text = parse_args(['--model', 'test_resnet', '--distill', 'kd', '--teacher', 'test_resnet',
                                  '--teacher-amp-dtype', 'bfloat16', '--teacher-compile'])
    assert {k: distill_task_kwargs(args)[k] for k in ('teacher_amp_dtype', 'compile_teacher')} == {
        'teacher_amp_dtype': 'bfloat16', 'compile_teacher': True}
    assert yaml.safe_load(args_text)['teacher_amp_dtype'] == 'bfloat16'
    ours, _ = _build_parser().parse_known_args(['--distill', 'kd', '--teacher-amp-dtype', 'float16'])
    assert distill_task_kwargs(ours)['teacher_amp_dtype'] == 'float16'
    assert distill_task_kwargs(ours)['compile_teacher'] is False
    # the benchmarks' method specs (benchmarks/overhead.py --methods) take them too
    assert tsd.parse_loss_spec('kd[teacher_amp_dtype=float16,compile_teacher=true]') == (
        'kd', {'teacher_amp_dtype': 'float16', 'compile_teacher': True})
    with pytest.raises(tsd.UsageError, match="expected true or false, got 'yes'"):
        tsd.parse_loss_spec('kd[compile_teacher=yes]')
    # how the teacher runs, not what the run learns: a resume may change it
    then = argparse.Namespace(model='test_resnet', distill='kd', teacher='test_resnet', teacher_amp_dtype=None,
                              teacher_compile=False)
    check_resume_matches('last.pth.tar', then, args)


def test_bad_flag_values_are_one_line_naming_the_flag(capsys, tmp_path):
    from test_user_errors import FLAGS, run_main, write_folder
    from timm_sadistill.cli import main
    write_folder(tmp_path / 'data')
    common = ['train', '--data-dir', str(tmp_path / 'data'), '--num-classes', '3', '--output', str(tmp_path / 'out')]
    line = run_main(common + FLAGS + ['--distill', 'kd', '--teacher', 'test_resnet', '--teacher-amp-dtype', 'fp8'],
                    capsys)
    assert "--teacher-amp-dtype: invalid choice: 'fp8'" in line
    line = run_main(common + FLAGS + ['--teacher-compile'], capsys)
    default = tsd.losses.default_distill_loss()
    others = ', '.join(name for name in tsd.list_distill_losses() if name != default)
    assert line == ('timm-sadistill train: error: --teacher-amp-dtype/--teacher-compile apply to a teacher: add '
                    f'--distill {default} (or {others}) and --teacher, or drop them.')
    logging.root.handlers.clear()


def _cli(args, cwd: Path) -> subprocess.CompletedProcess:
    from test_cli import cli_env
    return subprocess.run([sys.executable, '-m', 'timm_sadistill'] + args, cwd=cwd, env=cli_env(),
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_train_and_timm_train_run_the_teacher_as_the_flags_say(tmp_path):
    from safetensors.torch import save_file
    from test_user_errors import FLAGS, write_folder
    write_folder(tmp_path / 'data')
    torch.manual_seed(0)
    save_file(timm.create_model('test_resnet', num_classes=3).state_dict(), str(tmp_path / 'teacher.safetensors'))
    teacher = ['--teacher-checkpoint', str(tmp_path / 'teacher.safetensors'), '--distill', 'kd',
               '--teacher-amp-dtype', 'bfloat16', '--teacher-compile']
    result = _cli(['train', '--data-dir', str(tmp_path / 'data'), '--num-classes', '3', '--output',
                   str(tmp_path / 'out'), '--experiment', 'cheap', '--teacher', 'test_resnet'] + FLAGS + teacher,
                  tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'teacher under bfloat16 autocast, teacher compiled' in result.stderr
    recorded = yaml.safe_load((tmp_path / 'out' / 'cheap' / 'args.yaml').read_text())
    assert recorded['teacher_amp_dtype'] == 'bfloat16' and recorded['teacher_compile'] is True

    report = tmp_path / 'timm_train.json'
    result = _cli(['timm-train', str(REPO_ROOT / 'tests' / 'fixtures' / 'timm_train_fixture.py'), '--model',
                   'test_resnet', '--img-size', '32', '--kd-model-name', 'test_resnet', '--result-json', str(report)]
                  + teacher, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    reported = json.loads(report.read_text())
    assert reported['teacher_amp_dtype'] == 'torch.bfloat16' and reported['teacher_compiled']
