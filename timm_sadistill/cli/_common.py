"""Helpers shared by the ``stages`` and ``viz`` subcommands: argument parsing, model creation, error reporting."""
import argparse
import sys
from typing import Any, Callable, Dict, List, Union

import timm
import torch.nn as nn

from ..losses.connectors import list_connectors
from .errors import USER_ERRORS

# --sa-* flag -> SADistillLoss option
SA_OPTIONS = {'sa_tau': 'tau', 'sa_p': 'p', 'sa_alpha': 'alpha', 'sa_beta': 'beta', 'sa_kd_weight': 'kd_weight',
              'sa_connector': 'connector'}

__all__ = ['USER_ERRORS', 'SA_OPTIONS', 'parse_stages', 'add_stage_arguments', 'add_sa_arguments', 'sa_options',
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


def add_sa_arguments(group) -> None:
    """The ``--sa-*`` options of SA (None: the loss's default), one flag per entry of `SA_OPTIONS`."""
    group.add_argument('--sa-tau', type=float, default=None, help='SA: spatial softmax temperature')
    group.add_argument('--sa-p', type=float, default=None, help='SA: power of |x| in the attention map')
    group.add_argument('--sa-alpha', type=float, default=None, help='SA: weight of the spatial distribution term')
    group.add_argument('--sa-beta', type=float, default=None, help='SA: weight of the attention-map term')
    group.add_argument('--sa-kd-weight', type=float, default=None, help='SA: weight of the logit KD term (0: off)')
    group.add_argument('--sa-connector', default=None, choices=list_connectors(), help='SA: student->teacher connector')


def sa_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The SA options given on the command line, as ``create_distill_task('sa', ...)`` keywords."""
    return {option: getattr(args, flag) for flag, option in SA_OPTIONS.items() if getattr(args, flag) is not None}


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
