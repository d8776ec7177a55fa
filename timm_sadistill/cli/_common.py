"""Helpers shared by the subcommands: model creation and the one place that turns a user error into exit status 2.

`USER_ERRORS` is the one list of what the command line treats as the user's error: the library raises `UsageError`
(and `MissingExtraError`, a subclass) where it detects a mistake, with a message that names the flag or file and the
fix; a non-finite loss is a problem of the run's settings and says which term. Any other exception is a bug and keeps
its traceback (exit status 1). Ctrl-C is one line too, with how to continue when the run says it, and exit status 130
(128 + SIGINT, what a shell reports for a process stopped by Ctrl-C).
"""
import sys
from typing import Callable, Optional, Tuple

import timm
import torch
import torch.nn as nn

from ..features import input_size_kwargs
from ..errors import UsageError
from ..tasks.nonfinite import NonFiniteLossError

__all__ = ['create_model', 'check_device', 'check_img_size', 'run_command', 'USER_ERRORS', 'INTERRUPTED_STATUS']

USER_ERRORS = (UsageError, NonFiniteLossError)
INTERRUPTED_STATUS = 130


def check_img_size(img_size: Optional[int], flag: str = '--img-size') -> Optional[Tuple[int, int]]:
    """(N, N) for ``--img-size N``, None when not given; UsageError for N <= 0 (timm would take the model's default
    without a word)."""
    if img_size is None:
        return None
    if img_size <= 0:
        raise UsageError(f"{flag} {img_size}: the input size is a positive number of pixels, e.g. {flag} 224.")
    return img_size, img_size


def create_model(name: str, img_size: Optional[Tuple[int, int]] = None, **kwargs) -> nn.Module:
    """A randomly initialised timm model (nothing downloads), built for inputs of ``img_size`` (H, W) when given (a
    ViT takes only the size it is built for); UsageError naming how to find models when unknown."""
    if not timm.is_model(name):
        raise UsageError(
            f"unknown model '{name}'; find timm model names with timm.list_models('*resnet*') "
            f"(e.g. python -c \"import timm; print(timm.list_models('*{name[:6]}*'))\")"
        )
    return timm.create_model(name, pretrained=False, **input_size_kwargs(name, img_size), **kwargs)


def check_device(flag: str, name: str) -> None:
    """Refuse a device name torch does not know, or a CUDA device on a machine without one, naming ``flag``."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"{flag} '{name}' is not a device; use cpu, cuda or cuda:N.") from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UsageError(f"{flag} {name}: no CUDA GPU is available on this machine; use {flag} cpu.")


def run_command(prog: str, body: Callable[[], int]) -> int:
    """Run ``body``; a user error (`USER_ERRORS`) becomes one ``<prog>: error: ...`` line on stderr and exit status 2,
    Ctrl-C one ``<prog>: interrupted...`` line (with what the KeyboardInterrupt says, e.g. how to continue the run)
    and `INTERRUPTED_STATUS`.

    Any other exception propagates: it is a bug, and its traceback is what a report needs.
    """
    try:
        return body()
    except USER_ERRORS as e:
        message = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        sys.stderr.write(f"{prog}: error: {message}\n")
        return 2
    except KeyboardInterrupt as e:
        sys.stderr.write(f"{prog}: interrupted" + (f": {str(e).splitlines()[0]}" if str(e).strip() else '.') + '\n')
        return INTERRUPTED_STATUS
