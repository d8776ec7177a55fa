"""Helpers shared by the ``stages`` and ``viz`` subcommands: argument parsing, model creation, error reporting."""
import argparse
import sys
from typing import Callable, List, Union

import timm
import torch.nn as nn

from .errors import USER_ERRORS

__all__ = ['USER_ERRORS', 'parse_stages', 'create_model', 'run_command']



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
