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
from ..model_folder import resolve_model_name
from ..tasks.nonfinite import NonFiniteLossError
from .distill_flags import option_flag

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


def create_model(name: str, img_size: Optional[Tuple[int, int]] = None, option: str = 'MODEL', **kwargs) -> nn.Module:
    """The timm model ``name`` names (`resolve_model_name`, its words for the name ``option``), built for inputs of
    ``img_size`` (H, W) when given (a ViT takes only the size it is built for): a registry name with random weights
    (nothing downloads), a model folder (``local-dir:``) or cached Hub repo (``hf-hub:``) with its own."""
    source = resolve_model_name(name, option)
    return timm.create_model(source.load_name, pretrained=source.has_weights, **input_size_kwargs(source.architecture, img_size),
                             **kwargs)


def check_device(flag: str, name: str) -> None:
    """Refuse a device name torch does not know, or a CUDA device on a machine without one, naming ``flag``."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"{flag} '{name}' is not a device; use cpu, cuda or cuda:N.") from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UsageError(f"{flag} {name}: no CUDA GPU is available on this machine; use {flag} cpu.")
    if device.type not in ('cpu', 'cuda'):  # mps, xpu, ...: each backend says whether this machine has one
        backend = getattr(torch.backends, device.type, None) or getattr(torch, device.type, None)
        if not getattr(backend, 'is_available', lambda: False)():
            raise UsageError(f"{flag} {name}: no {device.type} device is available on this machine; use {flag} cpu.")



def run_command(prog: str, body: Callable[[], int]) -> int:
    """Run ``body``; a user error (`USER_ERRORS`) becomes one ``<prog>: error: ...`` line on stderr and exit status 2,
    in the command line's words (an error that carries its options names each by its flag, `option_flag`); Ctrl-C
    one ``<prog>: interrupted...`` line (with what the KeyboardInterrupt says, e.g. how to continue the run) and
    `INTERRUPTED_STATUS`.

    Any other exception propagates: it is a bug, and its traceback is what a report needs.
    """
    try:
        return body()
    except USER_ERRORS as e:
        if isinstance(e, UsageError):
            message = e.worded(lambda option: option_flag(option, e.loss), ' ')
        else:
            message = str(e)
        message = message.splitlines()[0] if message.strip() else type(e).__name__
        sys.stderr.write(f"{prog}: error: {message}\n")
        return 2
    except KeyboardInterrupt as e:
        sys.stderr.write(f"{prog}: interrupted" + (f": {str(e).splitlines()[0]}" if str(e).strip() else '.') + '\n')
        return INTERRUPTED_STATUS
