"""A loss's options are declared once, in its constructor: the registry reads them, the factories check values
against them, and the command line derives a flag per option (for third-party losses too), the records of a run
and what ``--resume`` compares."""
import importlib
import math
import re
import sys
from pathlib import Path
from typing import Annotated, Literal

import pytest
import timm
import torch
import yaml

import timm_sadistill as tsd
from timm_sadistill.cli.distill_flags import distill_task_kwargs, loss_flag, option_flag
from timm_sadistill.cli.train import build_parser, parse_args
from timm_sadistill.losses import _registry

REPO_ROOT = Path(__file__).resolve().parents[2]
SA_FLAGS = ['--sa-tau', '--sa-p', '--sa-alpha', '--sa-beta', '--sa-kd-weight', '--sa-logit-loss', '--sa-logit-weighting',
            '--sa-teacher-correction', '--sa-gate', '--sa-connector', '--sa-backend',
            '--sa-standardize', '--sa-warmup-steps', '--sa-ramp-steps', '--sa-cam-weight']


@pytest.fixture
def registry_snapshot():
    """Losses a test registers are unregistered afterwards."""
    before = dict(_registry._LOSSES)
    yield
    _registry._LOSSES.clear()
    _registry._LOSSES.update(before)


def _actions(parser):
    return {flag: action for action in parser._actions for flag in action.option_strings}


def test_every_builtin_option_is_typed_defaulted_and_documented():
    for name in tsd.list_distill_losses():
        declared = tsd.loss_options(name)
        assert declared.options, name
        for option in declared.options.values():
            assert option.type in (float, int, bool, str) and option.help, (name, option)
            assert option.problem(option.default) is None, (name, option)
    assert tsd.loss_options('at').options['mode'].choices == ('code', 'paper')
    assert tsd.loss_options('sa').options['connector'].choices == tuple(tsd.losses.list_connectors())
    assert tsd.loss_options('dkd').options['beta'].bound is tsd.NonNegative
    assert tsd.loss_options('cwd').options['tau'].bound is tsd.Positive


def test_registration_refuses_an_option_without_type_default_or_help(registry_snapshot):
    def loss(init, doc='Args:\n    weight: the weight.'):
        return type('Incomplete', (tsd.DistillLoss,), {'__init__': init, '__doc__': doc, 'stage_policy': 'none'})

    def untyped(self, student_channels=(), teacher_channels=(), weight=1.0):
        pass

    def no_default(self, weight: float, student_channels=(), teacher_channels=()):
        pass

    def typed(self, student_channels=(), teacher_channels=(), weight: float = 1.0):
        pass

    def listed(self, student_channels=(), teacher_channels=(), weight: list = ()):
        pass

    def negative(self, student_channels=(), teacher_channels=(), weight: Annotated[float, tsd.NonNegative] = -1.0):
        pass

    cases = [
        (loss(untyped), "option 'weight' needs a type annotation: float, int, bool, str or Literal"),
        (loss(no_default), "option 'weight' needs a default"),
        (loss(typed, doc='Weights things.'), "option 'weight' needs a help line: an entry 'weight: what it does' in the Args:"),
        (loss(listed), "option 'weight' needs a type annotation"),
        (loss(negative), "the default of option 'weight' must be >= 0, got -1.0"),
    ]
    for cls, message in cases:
        with pytest.raises(tsd.UsageError, match=message):
            tsd.register_distill_loss('test_incomplete')(cls)
        assert 'test_incomplete' not in tsd.list_distill_losses()


def test_literal_and_init_docstring_declare_too(registry_snapshot):
    @tsd.register_distill_loss('test_choice')
    class Choice(tsd.DistillLoss):
        stage_policy = 'none'

        def __init__(self, student_channels=(), teacher_channels=(), mode: Literal['a', 'b'] = 'a',
                     steps: Annotated[int, tsd.NonNegative] = 0, on: bool = True):
            """Args:
                mode: which one; a long help that goes on
                    over two lines.
                steps, on: shared help.
            """
            super().__init__(student_channels, teacher_channels)

    options = tsd.loss_options('test_choice').options
    assert (options['mode'].type, options['mode'].choices) == (str, ('a', 'b'))
    assert options['mode'].help == 'which one; a long help that goes on over two lines'
    assert options['steps'].help == options['on'].help == 'shared help'
    assert tsd.create_distill_loss('test_choice', steps=3).option_values == {'mode': 'a', 'steps': 3, 'on': True}
    with pytest.raises(tsd.UsageError, match=r'Choice: steps must be >= 0, got -1\.'):
        Choice(steps=-1)
    with pytest.raises(tsd.UsageError, match="Choice: steps must be an int, got 1.5"):
        Choice(steps=1.5)
    with pytest.raises(tsd.UsageError, match="Choice: on must be a bool, got 'yes'"):
        Choice(on='yes')


@pytest.mark.parametrize('name, option, value, words', [
    ('dkd', 'beta', -1.0, 'DKDLoss: beta must be >= 0, got -1.0.'),
    ('dkd', 'alpha', math.nan, 'DKDLoss: alpha must be a finite number, got nan.'),
    ('kd', 'weight', math.inf, 'KDLoss: weight must be a finite number, got inf.'),
    ('kd', 'temperature', 0.0, 'KDLoss: temperature must be > 0, got 0.0.'),
    ('sa', 'cam_weight', -0.5, 'SADistillLoss: cam_weight must be >= 0, got -0.5.'),
    ('sa', 'tau', -4.0, 'SADistillLoss: tau must be > 0, got -4.0.'),
    ('sa', 'warmup_steps', -1, 'SADistillLoss: warmup_steps must be >= 0, got -1.'),
    ('at', 'p', 0.0, 'ATLoss: p must be > 0, got 0.0.'),
    ('cwd', 'tau', math.nan, 'CWDLoss: tau must be a finite number, got nan.'),
    ('fitnet', 'weight', -3.0, 'FitNetLoss: weight must be >= 0, got -3.0.'),
])
def test_the_api_refuses_nan_inf_and_out_of_bound_values_naming_the_option(name, option, value, words):
    channels = dict(student_channels=[4], teacher_channels=[4])
    with pytest.raises(tsd.UsageError, match='^' + re.escape(words) + '$'):
        tsd.create_distill_loss(name, **channels, **{option: value})
    with pytest.raises(tsd.UsageError, match=option):  # direct construction is checked the same way
        tsd.get_distill_loss_class(name)(**channels, **{option: value})


def test_create_distill_task_refuses_a_bad_option_before_the_teacher_loads(monkeypatch):
    import timm_sadistill.tasks.distill_task as distill_task
    monkeypatch.setattr(distill_task, 'resolve_teacher', lambda *a, **k: pytest.fail('built the teacher'))
    student = timm.create_model('test_resnet', num_classes=3)
    with pytest.raises(tsd.UsageError, match=r'DKDLoss: beta must be >= 0, got -2\.0\.'):
        tsd.create_distill_task('dkd', student, 'resnet18', beta=-2.0)
    with pytest.raises(tsd.UsageError, match=r'SADistillLoss: temperature must be a finite number, got nan\.'):
        tsd.create_distill_task('sa', student, 'resnet18', temperature=math.nan)
    with pytest.raises(tsd.UsageError, match=r'SADistillLoss: tau must be > 0, got 0'):
        tsd.SADistillTask(student, 'resnet18', tau=0)


def test_every_registered_option_is_a_flag_with_its_help(monkeypatch):
    monkeypatch.setenv('COLUMNS', '1000')  # one line per flag in --help
    parser = build_parser()[1]
    actions = _actions(parser)
    text = parser.format_help()
    assert [f for f in actions if f.startswith('--sa-')] == SA_FLAGS  # SA's flags keep their names
    for name in tsd.list_distill_losses():
        for option in tsd.loss_options(name).options.values():
            if option.name == 'temperature':
                assert loss_flag(name, option.name) == '--kd-temperature'  # timm's one flag, for every method
                assert name == 'kd' or f'--{name}-temperature' not in actions
                continue
            flag = f"--{name}-{option.name.replace('_', '-')}"
            action = actions[flag]
            assert action.option_strings == [flag] and action.default is None
            assert action.help == f'{option.help} (default: {option.default})'
            assert list(action.choices or ()) == list(option.choices)
            assert flag in text and option.help in text, flag
    assert actions['--sa-standardize'].type('false') is False and actions['--sa-standardize'].type('yes') is True
    assert actions['--sa-tau'].type is float and actions['--sa-warmup-steps'].type is int
    from timm_sadistill.cli import timm_train, viz
    assert {f for f in actions if f.startswith(('--dkd-', '--at-', '--sa-'))} <= set(_actions(timm_train._build_parser()))
    viz_flags = _actions(viz.build_parser())
    assert set(SA_FLAGS) <= set(viz_flags) and '--dkd-beta' not in viz_flags  # viz draws SA's maps


def _task_from_flags(argv, student_classes=3):
    args, _ = parse_args(argv)
    kwargs = distill_task_kwargs(args)
    student = timm.create_model('test_resnet', num_classes=student_classes)
    teacher = timm.create_model('test_resnet', num_classes=student_classes)
    return tsd.create_distill_task(args.distill, student, teacher, img_size=64, verbose=False, **kwargs)


def test_flags_reach_the_loss():
    dkd = _task_from_flags(['--distill', 'dkd', '--dkd-beta', '2', '--kd-temperature', '3'])
    assert isinstance(dkd.distill_loss, tsd.DKDLoss)
    assert (dkd.distill_loss.beta, dkd.distill_loss.alpha, dkd.distill_loss.temperature) == (2.0, 1.0, 3.0)
    assert _task_from_flags(['--distill', 'at', '--at-mode', 'paper']).distill_loss.mode == 'paper'
    fitnet = _task_from_flags(['--distill', 'fitnet', '--fitnet-weight', '3', '--fitnet-connector', 'conv1x1'])
    assert fitnet.distill_loss.option_values == {'weight': 3.0, 'connector': 'conv1x1'}
    sa = _task_from_flags(['--distill', 'sa', '--sa-tau', '2', '--sa-standardize', 'true', '--sa-backend', 'torch'])
    assert (sa.distill_loss.tau, sa.distill_loss.standardize, sa.distill_loss.backend) == (2.0, True, 'torch')


@pytest.mark.parametrize('argv, words', [
    (['--distill', 'kd', '--fitnet-weight', '3'],
     '--fitnet-weight: an option of --distill fitnet, but the method is --distill kd; drop it or use --distill fitnet.'),
    (['--sa-tau', '2', '--sa-beta', '1'],
     '--sa-tau, --sa-beta: options of --distill sa, but the method is --distill none; drop them or use --distill sa.'),
    (['--distill', 'dkd', '--dkd-beta', '-1'], '--dkd-beta must be >= 0, got -1.0.'),
    (['--distill', 'sa', '--sa-warmup-steps', '-5'], '--sa-warmup-steps must be >= 0, got -5.'),
    (['--distill', 'kd', '--kd-temperature', '0'], '--kd-temperature must be > 0, got 0.0.'),
    (['--distill', 'cwd', '--cwd-tau', 'nan'], '--cwd-tau must be a finite number, got nan.'),
])
def test_the_command_line_names_the_flag(argv, words):
    with pytest.raises(tsd.UsageError) as refused:
        parse_args(argv)
    assert str(refused.value) == words


def _import_example(monkeypatch):
    """examples/custom_loss.py imported as a user's module: it registers 'sp'."""
    monkeypatch.syspath_prepend(str(REPO_ROOT / 'examples'))
    monkeypatch.delitem(sys.modules, 'custom_loss', raising=False)
    return importlib.import_module('custom_loss')


def test_a_third_party_loss_gets_its_flags(monkeypatch, registry_snapshot):
    example = _import_example(monkeypatch)
    assert tsd.get_distill_loss_class('sp') is example.SimilarityPreservingLoss
    assert tsd.loss_options('sp').options['weight'].help == 'weight of the similarity-preserving term'
    action = _actions(build_parser()[1])['--sp-weight']
    assert action.help == 'weight of the similarity-preserving term (default: 3000.0)'
    args, _ = parse_args(['--distill', 'sp', '--sp-weight', '5'])
    assert distill_task_kwargs(args)['weight'] == 5.0
    with pytest.raises(tsd.UsageError, match='--sp-weight must be >= 0'):
        parse_args(['--distill', 'sp', '--sp-weight', '-5'])
    with pytest.raises(tsd.UsageError, match='--sp-weight: an option of --distill sp, but the method is --distill kd'):
        parse_args(['--distill', 'kd', '--sp-weight', '5'])


def test_an_entry_point_plugin_is_loaded_before_the_parser_is_built(tmp_path, monkeypatch, registry_snapshot):
    # an installed package declaring [project.entry-points."timm_sadistill.losses"] sp = "custom_loss"
    info = tmp_path / 'sp_plugin-0.1.dist-info'
    info.mkdir()
    (info / 'METADATA').write_text('Metadata-Version: 2.1\nName: sp-plugin\nVersion: 0.1\n')
    (info / 'entry_points.txt').write_text(f'[{tsd.losses._plugins.PLUGIN_GROUP}]\nsp = custom_loss\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(REPO_ROOT / 'examples'))
    monkeypatch.delitem(sys.modules, 'custom_loss', raising=False)
    assert 'sp' not in tsd.list_distill_losses()
    actions = _actions(build_parser()[1])
    assert 'sp' in actions['--distill'].choices and '--sp-weight' in actions
    from timm_sadistill.cli import stages
    assert 'sp' in _actions(stages.build_parser())['--distill'].choices
    (info / 'entry_points.txt').write_text(f'[{tsd.losses._plugins.PLUGIN_GROUP}]\nbroken = no_such_module_here\n')
    with pytest.raises(tsd.UsageError, match="plugin 'broken' .*does not import: ModuleNotFoundError"):
        build_parser()


def test_one_parser_reads_the_method_specs():
    parse = tsd.parse_loss_spec
    assert parse('sa') == ('sa', {}) and parse('none') == ('none', {})
    assert parse('sa[cam_weight=1,standardize=true,connector=conv1x1]') == (
        'sa', {'cam_weight': 1, 'standardize': True, 'connector': 'conv1x1'})
    assert parse('kd[temperature=8.0,distill_loss_weight=0.5]') == ('kd', {'temperature': 8.0, 'distill_loss_weight': 0.5})
    assert parse('sa[teacher_stages=-2|-1]') == ('sa', {'teacher_stages': [-2, -1]})
    assert parse('fitnet[weight=3.0,teacher_stages=-2]') == ('fitnet', {'weight': 3.0, 'teacher_stages': -2})
    assert parse('sa[warmup_steps=60,backend=torch]') == ('sa', {'warmup_steps': 60, 'backend': 'torch'})
    name, options = parse('sa[cam_weight=1,kd_weight=2,temperature=12.0]')
    assert all(type(v) is float for v in options.values())  # converted by the declared types
    with pytest.raises(tsd.UsageError, match="'sa' has no option 'gamma'; it has tau, p"):
        parse('sa[gamma=1]')
    with pytest.raises(tsd.UsageError, match='standardize=yes: write true or false'):
        parse('sa[standardize=yes]')
    with pytest.raises(tsd.UsageError, match='warmup_steps=1.5: expected int'):
        parse('sa[warmup_steps=1.5]')


def test_a_runs_args_yaml_reads_back_with_its_records(tmp_path):
    config = tmp_path / 'args.yaml'
    config.write_text(yaml.safe_dump({'distill': 'sa', 'sa_tau': 2.0, 'distill_options': {'tau': 2.0},
                                      'distill_stages_resolved': ['layer1'], 'teacher_stages_resolved': ['layer1']}))
    args, _ = parse_args(['-c', str(config)])
    assert args.distill == 'sa' and args.sa_tau == 2.0 and not hasattr(args, 'distill_options')



@pytest.mark.slow
def test_resume_compares_the_loss_options_and_stages_the_run_used(tmp_path, capsys):
    from safetensors.torch import save_file
    from test_user_errors import FLAGS, run_main, write_folder
    from timm_sadistill.cli import main

    write_folder(tmp_path / 'data')
    torch.manual_seed(0)
    save_file(timm.create_model('test_resnet', num_classes=3).state_dict(), str(tmp_path / 'teacher.safetensors'))
    common = ['train', '--data-dir', str(tmp_path / 'data'), '--num-classes', '3', '--output', str(tmp_path / 'out'),
              '--experiment', 'sa', '--distill', 'sa', '--teacher', 'test_resnet',
              '--teacher-checkpoint', str(tmp_path / 'teacher.safetensors')] + FLAGS
    assert main(common) == 0
    folder = tmp_path / 'out' / 'sa'
    recorded = yaml.safe_load((folder / 'args.yaml').read_text())
    assert recorded['distill_options'] == {n: o.default for n, o in tsd.loss_options('sa').options.items()}
    stages = recorded['distill_stages_resolved']
    assert stages and recorded['distill_stages'] == 'auto' and recorded['teacher_stages_resolved'] == stages
    last = str(folder / 'last.pth.tar')
    resume = common + ['--epochs', '2', '--resume', last]
    line = run_main(resume + ['--sa-tau', '2'], capsys)
    assert line == (f"timm-sadistill train: error: --resume '{last}' is a run with --sa-tau 4.0, this command has "
                    f"--sa-tau 2.0; resume with --sa-tau 4.0, or start a new --experiment without --resume.")
    line = run_main(resume + ['--distill-stages', stages[0]], capsys)
    assert f"is a run with --distill-stages {','.join(stages)}, this command has --distill-stages {stages[0]}" in line
    # the defaults spelled out, and the stages auto chose named: the same loss, so the run continues
    assert main(resume + ['--sa-connector', 'conv1x1', '--kd-temperature', '16',
                          '--distill-stages', ','.join(stages), '--teacher-stages', ','.join(stages)]) == 0
    assert yaml.safe_load((folder / 'args.yaml').read_text())['sa_connector'] == 'conv1x1'


def test_resume_compares_what_the_loss_computes_not_how():
    """A run resumed on another kernel backend computes the same loss; another tau would change it half-way."""
    from argparse import Namespace

    from timm_sadistill.errors import UsageError
    from timm_sadistill.training.resume_checks import check_resume_distill
    then = Namespace(distill='sa', distill_options={'tau': 4.0, 'backend': 'triton'})
    check_resume_distill('last.pth.tar', then, Namespace(distill='sa', distill_options={'tau': 4.0, 'backend': 'torch'}))
    with pytest.raises(UsageError) as refused:
        check_resume_distill('last.pth.tar', then, Namespace(distill='sa', distill_options={'tau': 2.0, 'backend': 'triton'}))
    # the error carries the option, which the command line words with its flag
    assert '--sa-tau 4.0, this command has --sa-tau 2.0' in refused.value.worded(
        option_flag(refused.value.option, refused.value.loss), ' ')
    # a run from before an option existed ran as its default: the gate (whose state the run did not save) is refused
    check_resume_distill('last.pth.tar', then, Namespace(distill='sa', distill_options={'tau': 4.0, 'gate': 'none'}))
    with pytest.raises(UsageError) as refused:
        check_resume_distill('last.pth.tar', then, Namespace(distill='sa', distill_options={'gate': 'while_ahead'}))
    assert "--sa-gate none, this command has --sa-gate while_ahead" in refused.value.worded(
        option_flag(refused.value.option, refused.value.loss), ' ')
