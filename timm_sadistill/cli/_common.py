"""Helpers shared by the subcommands: model creation, the device and size checks (which live below the command line,
in `timm_sadistill._device_and_size_checks`, for `training` too) and the one place that turns a user error into exit
status 2.

`USER_ERRORS` is the one list of what the command line treats as the user's error: the library raises `UsageError`
(and `MissingExtraError`, a subclass) where it detects a mistake, with a message that names the flag or file and the
fix; a non-finite loss is a problem of the run's settings and says which term. Any other exception is a bug and keeps
its traceback (exit status 1). Ctrl-C is one line too, with how to continue when the run says it, and exit status 130
(128 + SIGINT, what a shell reports for a process stopped by Ctrl-C); SIGTERM, what a cluster or torchrun sends
before a kill, is handled the same way, with exit status 143 (128 + SIGTERM).
"""
import sys
from typing import Callable, Optional, Tuple

import timm
import torch.nn as nn

from .._device_and_size_checks import check_device, check_img_size  # noqa: F401  (viz and stages import them here)
from ..features import input_size_kwargs
from .._termination import TERMINATED_STATUS, Terminated, sigterm_interrupts
from ..errors import UsageError
from ..model_folder import resolve_model_name
from ..tasks.nonfinite import NonFiniteLossError
from .distill_flags import option_flag

__all__ = ['create_model', 'check_device', 'check_img_size', 'run_command', 'USER_ERRORS', 'INTERRUPTED_STATUS']

USER_ERRORS = (UsageError, NonFiniteLossError)
INTERRUPTED_STATUS = 130


def create_model(name: str, img_size: Optional[Tuple[int, int]] = None, option: str = 'MODEL', **kwargs) -> nn.Module:
    """The timm model ``name`` names (`resolve_model_name`, its words for the name ``option``), built for inputs of
    ``img_size`` (H, W) when given (a ViT takes only the size it is built for): a registry name with random weights
    (nothing downloads), a model folder (``local-dir:``) or cached Hub repo (``hf-hub:``) with its own."""
    source = resolve_model_name(name, option)
    return timm.create_model(source.load_name, pretrained=source.has_weights, **input_size_kwargs(source.architecture, img_size),
                             **kwargs)


def run_command(prog: str, body: Callable[[], int]) -> int:
    """Run ``body``; a user error (`USER_ERRORS`) becomes one ``<prog>: error: ...`` line on stderr and exit status 2,
    in the command line's words (an error that carries its options names each by its flag, `option_flag`); Ctrl-C
    one ``<prog>: interrupted...`` line (with what the KeyboardInterrupt says, e.g. how to continue the run) and
    `INTERRUPTED_STATUS`; SIGTERM is handled as Ctrl-C is (`timm_sadistill._termination`), its line
    ``<prog>: terminated (SIGTERM)...`` and its status `TERMINATED_STATUS`.

    Any other exception propagates: it is a bug, and its traceback is what a report needs.
    """
    try:
        with sigterm_interrupts() as terminated:
            return body()
    except USER_ERRORS as e:
        if isinstance(e, UsageError):
            message = e.worded(lambda option: option_flag(option, e.loss), ' ')
        else:
            message = str(e)
        message = message.splitlines()[0] if message.strip() else type(e).__name__
        sys.stderr.write(f"{prog}: error: {message}\n")
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (`timm_sadistill._termination`): the same clean-up
        how = 'terminated (SIGTERM)' if terminated else 'interrupted'
        said = str(e).splitlines()[0] if str(e).strip() and not isinstance(e, Terminated) else ''
        sys.stderr.write(f"{prog}: {how}" + (f": {said}" if said else '.') + '\n')
        return TERMINATED_STATUS if terminated else INTERRUPTED_STATUS
