"""Helpers shared by the ``stages`` and ``viz`` subcommands: argument parsing, model creation, error reporting."""
import argparse
import sys
from typing import Any, Callable, Dict, List, Union

import timm
import torch.nn as nn

from ..losses.sa import SA_OPTIONS, SAOption
from .errors import USER_ERRORS

__all__ = ['USER_ERRORS', 'parse_stages', 'add_stage_arguments', 'add_sa_arguments', 'sa_options', 'sa_flag',
           'create_model', 'run_command']


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


def add_stage_arguments(group) -> None:
    """``--distill-stages`` and ``--teacher-stages`` (names, indices or auto), as every subcommand spells them."""
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


def create_model(name: str, **kwargs) -> nn.Module:
    """A randomly initialised timm model (nothing downloads); ValueError naming how to find models when unknown."""
    if not timm.is_model(name):
        raise ValueError(
            f"unknown model '{name}'; find timm model names with timm.list_models('*resnet*') "
            f"(e.g. python -c \"import timm; print(timm.list_models('*{name[:6]}*'))\")"
        )
    return timm.create_model(name, pretrained=False, **kwargs)


def run_command(prog: str, body: Callable[[], int]) -> int:
    """Run ``body``; a user error becomes one ``<prog>: error: ...`` line on stderr and exit status 2."""
    try:
        return body()
    except USER_ERRORS as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        sys.stderr.write(f"{prog}: error: {message}\n")
        return 2
