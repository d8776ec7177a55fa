"""The distillation flags, defined once for ``train``, ``timm-train`` and (stages, SA options) ``viz``.

``--distill``, the teacher's weights (``--teacher-checkpoint``, ``--teacher-pretrained``), the stages
(``--distill-stages``, ``--teacher-stages``) and the ``--sa-*`` flags, derived from `SA_OPTIONS`; and the
translation of the parsed flags into ``create_distill_task`` keywords.
"""
import argparse
import re
from typing import Any, Dict, List, Sequence, Union

from ..losses import list_distill_losses
from ..losses.sa import SA_OPTIONS, SAOption
from ..model_folder import ModelName
from ..tasks import check_teacher_weights
from ..errors import UsageError

__all__ = [
    'add_distill_arguments', 'add_stage_arguments', 'add_sa_arguments', 'parse_stages', 'join_stage_values',
    'sa_flag', 'sa_options', 'distill_task_kwargs', 'check_teacher_flags',
]

STAGE_FLAGS = ('--distill-stages', '--teacher-stages')
_NEGATIVE_FIRST = re.compile(r'-\d+(,.*)?')  # '-2,-1', '-1,layer4': a stage list that starts with a negative index


def add_distill_arguments(parser: argparse.ArgumentParser, include_timm_kd_flags: bool = True) -> None:
    """The distillation flags, defined once for ``train`` and ``timm-train``.

    ``include_timm_kd_flags`` adds the flags timm's own train.py already has (``--kd-model-name`` alias
    ``--teacher``, ``--distill-loss-weight``, ``--task-loss-weight``, ``--kd-temperature``); ``timm-train`` leaves
    them out so they reach the user's train.py untouched.
    """
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
                           help="Logit temperature for methods that have one (default: the method's own, 4.0)")
    group.add_argument('--teacher-checkpoint', default=None, metavar='FILE',
                       help='Teacher weights: .safetensors or timm .pth/.pth.tar (e.g. a teacher run\'s model.safetensors)')
    group.add_argument('--teacher-pretrained', action='store_true', default=False,
                       help='Download the teacher weights from the hub (only with this flag does anything download)')
    add_stage_arguments(group)
    add_sa_arguments(group)


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


def sa_flag(option: SAOption) -> str:
    """The command-line flag of an SA option: ``kd_weight`` -> ``--sa-kd-weight``."""
    return '--sa-' + option.name.replace('_', '-')


def add_sa_arguments(group) -> None:
    """One ``--sa-*`` flag per command-line option of `SA_OPTIONS` (default None: the loss's default)."""
    for option in SA_OPTIONS:
        if option.flag:
            group.add_argument(sa_flag(option), type=option.type, default=None, choices=option.choices or None,
                               help='SA: ' + option.help)


def sa_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The SA options given on the command line, as ``create_distill_task('sa', ...)`` keywords."""
    given = {option.name: getattr(args, 'sa_' + option.name) for option in SA_OPTIONS if option.flag}
    return {name: value for name, value in given.items() if value is not None}


def distill_task_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """Keyword arguments for ``create_distill_task`` from the flags of `add_distill_arguments`.

    Raises:
        UsageError: an SA flag given to another method.
    """
    sa_given = sa_options(args)
    if sa_given and args.distill != 'sa':
        flags = ', '.join(sa_flag(option) for option in SA_OPTIONS if option.name in sa_given)
        raise UsageError(f"{flags}: SA options, but the method is --distill {args.distill}; drop them or use --distill sa.")
    return dict(
        teacher_pretrained_path=args.teacher_checkpoint,
        teacher_pretrained=args.teacher_pretrained,
        student_stages=args.distill_stages,
        teacher_stages=args.teacher_stages,
        **sa_given,
    )


def check_teacher_flags(teacher: str, args: argparse.Namespace, flag: str = '--teacher') -> ModelName:
    """What the teacher flag (``--teacher``; timm-train's ``--kd-model-name``) names, refused before anything is
    built when the flags cannot give it weights (see `check_teacher_weights`)."""
    return check_teacher_weights(teacher, args.teacher_checkpoint, args.teacher_pretrained,
                                 path_option='--teacher-checkpoint FILE', hub_option='--teacher-pretrained',
                                 name_option=flag)
