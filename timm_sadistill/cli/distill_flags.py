"""The distillation flags, defined once for ``train``, ``timm-train`` and (stages, SA's options) ``viz``.

``--distill``, the teacher's weights (``--teacher-checkpoint``, ``--teacher-pretrained``), its precision and
compilation (``--teacher-amp-dtype``, ``--teacher-compile``), the stages (``--distill-stages``,
``--teacher-stages``) and one flag per option of every registered loss, ``--<loss>-<option>`` (`loss_flag`, the one
translation of an option to its flag), read from the loss's constructor by `loss_options`; and the translation of
the parsed flags into ``create_distill_task`` keywords.
"""
import argparse
import re
from typing import Any, Dict, List, Optional, Sequence, Union

from ..losses import LossOption, get_distill_loss_class, list_distill_losses, load_loss_plugins, loss_options
from ..model_folder import ModelName
from ..tasks import check_teacher_weights
from ..tasks.teacher_precision import TEACHER_AMP_DTYPES
from ..errors import UsageError

__all__ = [
    'add_distill_arguments', 'add_stage_arguments', 'add_loss_arguments', 'parse_stages', 'join_stage_values',
    'loss_flag', 'loss_flag_options', 'option_flag', 'distill_task_kwargs', 'check_teacher_flags', 'parse_bool',
    'TASK_FLAGS',
]

STAGE_FLAGS = ('--distill-stages', '--teacher-stages')
_NEGATIVE_FIRST = re.compile(r'-\d+(,.*)?')  # '-2,-1', '-1,layer4': a stage list that starts with a negative index


def add_distill_arguments(parser: argparse.ArgumentParser, include_timm_kd_flags: bool = True) -> None:
    """The distillation flags, defined once for ``train`` and ``timm-train``.

    ``include_timm_kd_flags`` adds the flags timm's own train.py already has (``--kd-model-name`` alias
    ``--teacher``, ``--distill-loss-weight``, ``--task-loss-weight``, ``--kd-temperature``); ``timm-train`` leaves
    them out so they reach the user's train.py untouched.
    """
    load_loss_plugins()  # a package's losses (entry points) get their --distill choice and flags
    group = parser.add_argument_group('Distillation parameters (timm-sadistill)')
    group.add_argument('--distill', default='none', choices=['none'] + list_distill_losses(),
                       help='Distillation method; "none" trains a plain model (default: none)')
    if include_timm_kd_flags:
        group.add_argument('--teacher', '--kd-model-name', dest='teacher', default=None, metavar='MODEL',
                           help='Teacher model name (timm), weights from --teacher-checkpoint; or local-dir:FOLDER '
                                '(a run\'s model/ folder: weights and classes included)')
        group.add_argument('--distill-loss-weight', default=None, type=float,
                           help='Weight of the distillation loss (timm rules: alone, task weight stays 1)')
        group.add_argument('--task-loss-weight', default=None, type=float,
                           help='Weight of the task loss (alone: distill weight = 1 - task weight)')
        group.add_argument('--kd-temperature', default=None, type=float,
                           help="Logit temperature for methods that have one: their temperature option "
                            "(default: the method's own, 4.0)")
    group.add_argument('--teacher-checkpoint', default=None, metavar='FILE',
                       help='Teacher weights: .safetensors or timm .pth/.pth.tar (e.g. a teacher run\'s model.safetensors)')
    group.add_argument('--teacher-pretrained', action='store_true', default=False,
                       help='Download the teacher weights from the hub (only with this flag does anything download)')
    group.add_argument('--teacher-amp-dtype', default=None, choices=list(TEACHER_AMP_DTYPES),
                       help='Run the frozen teacher alone under this autocast dtype, its outputs cast back to float32 '
                            'for the loss; the student keeps --amp/--amp-dtype (default: the student\'s precision)')
    group.add_argument('--teacher-compile', action='store_true', default=False,
                       help='Compile the frozen teacher\'s forward with torch.compile, without --torchcompile')
    add_stage_arguments(group)
    add_loss_arguments(parser)


def parse_stages(value: str) -> Union[str, List[Union[str, int]]]:
    """``'auto'`` -> 'auto'; ``'layer3,layer4'`` -> ['layer3', 'layer4']; ``'-2,-1'`` -> [-2, -1]."""
    if value.strip() == 'auto':
        return 'auto'
    stages: List[Union[str, int]] = []
    for item in value.split(','):
        item = item.strip()
        if not item:
            raise argparse.ArgumentTypeError(f"empty stage in '{value}'; use e.g. layer3,layer4 or -2,-1 or auto")
        try:
            stages.append(int(item))
        except ValueError:
            stages.append(item)
    return stages


def join_stage_values(argv: Sequence[str]) -> List[str]:
    """``['--teacher-stages', '-2,-1']`` -> ``['--teacher-stages=-2,-1']``, the rest of ``argv`` as it is.

    argparse reads a value that starts with '-' and is not a plain number as an option of its own ("expected one
    argument"); the README writes ``--teacher-stages -2,-1``, so every parser of the stage flags reads ``argv``
    through this first.
    """
    joined: List[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in STAGE_FLAGS and i + 1 < len(argv) and _NEGATIVE_FIRST.fullmatch(argv[i + 1]):
            joined.append(f'{argv[i]}={argv[i + 1]}')
            i += 2
        else:
            joined.append(argv[i])
            i += 1
    return joined


def add_stage_arguments(group) -> None:
    """``--distill-stages`` and ``--teacher-stages`` (names, indices or auto), as every subcommand spells them; parse
    ``argv`` through `join_stage_values` so that ``--teacher-stages -2,-1`` reads as written."""
    group.add_argument('--distill-stages', type=parse_stages, default='auto', metavar='STAGES',
                       help='Student stages: comma list of feature_info names or indices, or auto (default: auto)')
    group.add_argument('--teacher-stages', type=parse_stages, default='auto', metavar='STAGES',
                       help='Teacher stages, paired in order with --distill-stages (default: auto)')


def loss_flag(method: str, option: str) -> str:
    """The flag of a loss option: ``('dkd', 'beta')`` -> ``--dkd-beta``, ``('sa', 'kd_weight')`` -> ``--sa-kd-weight``;
    every method's ``temperature`` is timm's one logit-temperature flag, ``--kd-temperature``."""
    if option == 'temperature':
        return '--kd-temperature'
    return f'--{method}-{option}'.replace('_', '-')


# the task's keywords (`create_distill_task`) that a flag sets, each with its flag: `distill_task_kwargs` reads the
# distillation flags through it, and `option_flag` names them in a message (a loss's options: `loss_flag`)
TASK_FLAGS = {
    'teacher_pretrained_path': '--teacher-checkpoint', 'teacher_pretrained': '--teacher-pretrained',
    'student_stages': '--distill-stages', 'teacher_stages': '--teacher-stages',
    'teacher_amp_dtype': '--teacher-amp-dtype', 'compile_teacher': '--teacher-compile',
    # set from the training flags by the training run, beside these
    'img_size': '--img-size', 'num_classes': '--num-classes', 'in_chans': '--in-chans',
}
_DISTILL_TASK_KEYWORDS = ('teacher_pretrained_path', 'teacher_pretrained', 'student_stages', 'teacher_stages',
                          'teacher_amp_dtype', 'compile_teacher')


def option_flag(option: str, loss: Optional[str] = None) -> str:
    """The flag of an option a `UsageError` carries: a loss's option (and the task's ``temperature``, which goes to
    the loss) by `loss_flag`, a task's from `TASK_FLAGS`; an option with no flag keeps its Python name."""
    if loss is not None or option == 'temperature':
        return loss_flag(loss or '', option)
    return TASK_FLAGS.get(option, option)


def _flag_dest(flag: str) -> str:
    """The namespace attribute argparse gives ``flag``: ``--teacher-checkpoint`` -> ``teacher_checkpoint``."""
    return flag[2:].replace('-', '_')


_METAVARS = {float: 'X', int: 'N', bool: 'BOOL', str: 'TEXT'}


def _dest(method: str, option: str) -> str:
    return _flag_dest(loss_flag(method, option))


def _flag_options(method: str) -> List[LossOption]:
    """The options of ``method`` that have a flag of their own (all but the temperature)."""
    return [o for o in loss_options(method).options.values() if o.name != 'temperature']


def parse_bool(text: str) -> bool:
    """'true'/'1'/'yes' -> True, 'false'/'0'/'no' -> False (argparse's ``type=bool`` takes any text as True)."""
    value = str(text).strip().lower()
    if value in ('true', '1', 'yes', 'on'):
        return True
    if value in ('false', '0', 'no', 'off'):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


def add_loss_arguments(parser: argparse.ArgumentParser, methods: Optional[Sequence[str]] = None) -> None:
    """One flag per option of each loss in ``methods`` (default: every registered one), a group per loss; default
    None: the loss's own default."""
    for method in methods or list_distill_losses():
        options = _flag_options(method)
        if not options:
            continue
        group = parser.add_argument_group(f'Options of --distill {method} ({get_distill_loss_class(method).__name__})')
        for option in options:
            flag = loss_flag(method, option.name)
            help = f'{option.help} (default: {option.default})'.replace('%', '%%')
            try:
                group.add_argument(flag, dest=_dest(method, option.name), default=None, help=help,
                                   type=parse_bool if option.type is bool else option.type,
                                   choices=option.choices or None,
                                   metavar=None if option.choices else _METAVARS[option.type])
            except argparse.ArgumentError:
                raise UsageError(f"Loss '{method}' has an option '{option.name}' whose flag {flag} this command "
                                 "already has; rename the option.") from None


def loss_flag_options(args: argparse.Namespace, method: str) -> Dict[str, Any]:
    """The options of ``method`` its flags set, as loss keywords (an unset flag leaves the loss's default), the
    ``temperature`` from ``--kd-temperature`` where the namespace has it and the method takes one.

    Raises:
        UsageError: a value the option's declaration refuses, or a set flag of another method, naming the flag.
    """
    given: Dict[str, Dict[str, Any]] = {}
    for other in list_distill_losses():
        for option in _flag_options(other):
            value = getattr(args, _dest(other, option.name), None)
            if value is not None:
                given.setdefault(other, {})[option.name] = value
    for other, options in given.items():
        if other != method:
            flags = ', '.join(loss_flag(other, name) for name in options)
            them = 'them' if len(options) > 1 else 'it'
            raise UsageError(f"{flags}: {'options' if len(options) > 1 else 'an option'} of --distill {other}, but the "
                             f"method is --distill {method}; drop {them} or use --distill {other}.")
    options = dict(given.get(method, {}))
    declared = loss_options(method).options if method in list_distill_losses() else {}
    if getattr(args, 'kd_temperature', None) is not None and 'temperature' in declared:
        options['temperature'] = args.kd_temperature
    for name, value in options.items():
        refusal = declared[name].refusal(value)  # the declaration's own check, worded with the flag
        if refusal:
            raise UsageError(UsageError(f'{refusal}.', option=name, loss=method).worded(loss_flag(method, name), ' '))
    return options


def distill_task_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """Keyword arguments for ``create_distill_task`` from the flags of `add_distill_arguments`.

    Raises:
        UsageError: a loss flag of another method, or a value its option refuses (see `loss_flag_options`).
    """
    return {**{keyword: getattr(args, _flag_dest(TASK_FLAGS[keyword])) for keyword in _DISTILL_TASK_KEYWORDS},
            **loss_flag_options(args, args.distill)}


def check_teacher_flags(teacher: str, args: argparse.Namespace, flag: str = '--teacher') -> ModelName:
    """What the teacher flag (``--teacher``; timm-train's ``--kd-model-name``) names, refused before anything is
    built when the flags cannot give it weights (see `check_teacher_weights`)."""
    return check_teacher_weights(teacher, args.teacher_checkpoint, args.teacher_pretrained,
                                 path_option='--teacher-checkpoint FILE', hub_option='--teacher-pretrained',
                                 name_option=flag)
