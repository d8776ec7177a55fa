"""Flag parity with timm's train.py: every flag of it is either accepted by ``timm-sadistill train`` with timm's
name and destination, or refused with one line that points to ``timm-sadistill timm-train``.

tests/data/timm_train_py_flags.json lists train.py's flags (train.py is not in timm's wheel, and nothing downloads
at test time); with ``TSD_TIMM_TRAIN_PY=path/to/train.py`` a test reads the real parser and compares it with that
list, so a new timm flag cannot go unnoticed.
"""
import argparse
import json
import os
import runpy
import sys
from pathlib import Path

import pytest
import torch
from timm.loss import BinaryCrossEntropy

from timm_sadistill.cli.timm_flags import NEEDS_TIMM_TRAIN
from timm_sadistill.cli.train import build_parser, parse_args
from conftest import TIMM_TRAIN_PY

FLAGS_FILE = Path(__file__).resolve().parents[1] / 'data' / 'timm_train_py_flags.json'


def timm_flags() -> list:
    return json.loads(FLAGS_FILE.read_text())['flags']


def test_every_timm_flag_is_accepted_with_its_meaning_or_refused():
    ours = {flag: action for action in build_parser()[1]._actions for flag in action.option_strings}
    refused = {flag for flags in NEEDS_TIMM_TRAIN for flag in flags}
    accepted, unhandled = [], []
    for entry in timm_flags():
        if set(entry['options']) <= refused:
            continue
        action = ours.get(entry['options'][0])
        if action is None or set(entry['options']) - set(action.option_strings):
            unhandled.append(entry['options'])
        elif action.dest != entry['dest'] and not (entry['dest'] == 'kd_model_name' and action.dest == 'teacher'):
            unhandled.append(entry['options'])
        else:
            accepted.append(entry['dest'])
    assert not unhandled, f'timm flags neither accepted nor in NEEDS_TIMM_TRAIN: {unhandled}'
    assert refused <= {flag for entry in timm_flags() for flag in entry['options']}, 'refusing a flag timm lacks'
    assert len(accepted) >= 110


def test_a_refused_flag_is_one_line_naming_timm_train(capsys):
    with pytest.raises(SystemExit) as exited:
        parse_args(['--model', 'test_resnet', '--naflex-loader', '--lr', '0.1'])
    err = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and len(err) == 1
    assert err[0].startswith("timm-sadistill train: error: --naflex-loader is a flag of timm's train.py")
    assert 'timm-sadistill timm-train path/to/train.py' in err[0]


def test_timm_config_keys_are_read_as_timm_writes_them(tmp_path):
    # timm's args.yaml lists every flag: kd_* keys and defaults of refused flags pass, other values are refused
    config = tmp_path / 'args.yaml'
    config.write_text('kd_model_name: resnet18\nkd_distill_type: logit\nkd_token_distill_type: soft\n'
                      'naflex_loader: false\nlayer_decay: 0.7\n')
    args, _ = parse_args(['-c', str(config)])
    assert args.teacher == 'resnet18' and args.layer_decay == 0.7
    config.write_text('kd_distill_type: feature\n')
    with pytest.raises(ValueError, match="sets kd_distill_type: --kd-distill-type is a flag of timm's train.py"):
        parse_args(['-c', str(config)])



def test_common_timm_flags_reach_the_optimizer_loss_and_model(tmp_path, monkeypatch):
    import timm_sadistill.cli.train as train
    import timm_sadistill.training.run as run
    from test_user_errors import FLAGS, write_folder

    write_folder(tmp_path / 'data')
    seen = {}
    create_task = run._create_task

    def spy(args, model, train_loss, *rest):
        seen.update(loss=train_loss, model=model)
        return create_task(args, model, train_loss, *rest)

    create_optimizer = run.create_optimizer_v2

    def spy_optimizer(*args, **kwargs):
        seen['optimizer'] = optimizer = create_optimizer(*args, **kwargs)
        return optimizer

    monkeypatch.setattr(run, '_create_task', spy)
    monkeypatch.setattr(run, 'create_optimizer_v2', spy_optimizer)
    assert train.main(['--data-dir', str(tmp_path / 'data'), '--num-classes', '3', '--output', str(tmp_path),
                       '--experiment', 'flags', '--model', 'test_vit', '--layer-decay', '0.5', '--opt', 'adamw',
                       '--opt-kwargs', 'amsgrad=True', '--bce-loss', '--bce-target-thresh', '0.2',
                       '--model-kwargs', 'qkv_bias=False', '--grad-checkpointing', '--head-init-bias', '-3',
                       '--gp', 'avg'] + FLAGS[2:]) == 0
    loss, model, optimizer = seen['loss'], seen['model'], seen['optimizer']
    assert isinstance(loss, BinaryCrossEntropy) and loss.target_threshold == 0.2
    assert all(group['amsgrad'] for group in optimizer.param_groups)
    scales = {round(group['lr_scale'], 6) for group in optimizer.param_groups}
    assert len(scales) > 2 and max(scales) == 1.0 and min(scales) < 0.5  # layer-wise decay
    assert model.blocks[0].attn.qkv.bias is None and model.grad_checkpointing and model.global_pool == 'avg'
    assert torch.all(model.get_classifier().bias != 0)  # moved from -3 by training, but not reset to 0


def test_mean_and_std_flags_reach_the_teachers_renormalisation(tmp_path, monkeypatch):
    import timm
    from safetensors.torch import save_file

    import timm_sadistill.cli.train as train
    import timm_sadistill.training.run as run
    from test_user_errors import FLAGS, write_folder

    write_folder(tmp_path / 'data')
    save_file(timm.create_model('test_resnet', num_classes=3).state_dict(), str(tmp_path / 'teacher.safetensors'))
    seen = {}
    create = run.create_distill_task

    def spy(*args, **kwargs):
        seen['task'] = task = create(*args, **kwargs)
        return task

    monkeypatch.setattr(run, 'create_distill_task', spy)
    assert train.main(['--data-dir', str(tmp_path / 'data'), '--num-classes', '3', '--output', str(tmp_path),
                       '--experiment', 'stats', '--distill', 'kd', '--teacher', 'test_resnet', '--teacher-checkpoint',
                       str(tmp_path / 'teacher.safetensors'), '--mean', '0.2', '0.3', '0.4', '--std', '0.1', '0.2',
                       '0.3'] + FLAGS) == 0
    task = seen['task']
    assert task.student_mean.flatten().tolist() == pytest.approx([0.2, 0.3, 0.4])
    assert task.student_std.flatten().tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert task.renormalize_teacher_input


@pytest.mark.skipif(not TIMM_TRAIN_PY, reason='no ../shared/timm/ copy; set TSD_TIMM_TRAIN_PY to a real timm train.py')
def test_the_flag_list_matches_a_real_timm_train_py(monkeypatch):
    monkeypatch.setattr(sys, 'argv', ['train.py'])
    module = runpy.run_path(TIMM_TRAIN_PY, run_name='timm_train_py')  # builds the parser only
    real = [{'dest': a.dest, 'options': a.option_strings} for a in module['parser']._actions
            if a.option_strings and not isinstance(a, argparse._HelpAction)]
    assert real == timm_flags(), 'timm train.py flags changed: update tests/data/timm_train_py_flags.json and ours'


@pytest.mark.parametrize('smoothing, mixup, expected', [
    (0.1, False, 'BinaryCrossEntropy'), (0.0, True, 'BinaryCrossEntropy'), (0.0, False, 'CrossEntropyLoss'),
])
def test_bce_loss_has_timm_train_py_meaning(smoothing, mixup, expected):
    """timm's train.py takes --bce-loss with label smoothing or mixup, and plain cross-entropy otherwise."""
    from timm_sadistill.training.run import _create_train_loss

    args, _ = parse_args(['--bce-loss', '--smoothing', str(smoothing)])
    assert type(_create_train_loss(args, mixup_active=mixup, device=torch.device('cpu'))).__name__ == expected
