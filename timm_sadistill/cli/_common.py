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
import re
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

__all__ = ['create_model', 'check_device', 'check_img_size', 'run_command', 'in_flag_words', 'USER_ERRORS',
           'INTERRUPTED_STATUS', 'PARAMETER_FLAGS']

USER_ERRORS = (UsageError, NonFiniteLossError)
INTERRUPTED_STATUS = 130


def create_model(name: str, img_size: Optional[Tuple[int, int]] = None, option: str = 'MODEL', **kwargs) -> nn.Module:
    """The timm model ``name`` names (`resolve_model_name`, its words for the name ``option``), built for inputs of
    ``img_size`` (H, W) when given (a ViT takes only the size it is built for): a registry name with random weights
    (nothing downloads), a model folder (``local-dir:``) or cached Hub repo (``hf-hub:``) with its own."""
    source = resolve_model_name(name, option)
    return timm.create_model(source.load_name, pretrained=source.has_weights, **input_size_kwargs(source.architecture, img_size),
                             **kwargs)


# the library's parameters that are flags here, as the library's messages name them (SA's options add theirs: the
# library's messages that name a loss option by itself are SA's; other losses' option errors are named by their
# flags before the library sees the values)
PARAMETER_FLAGS = {
    'student_stages': '--distill-stages', 'teacher_stages': '--teacher-stages', 'img_size': '--img-size',
    'num_classes': '--num-classes', 'in_chans': '--in-chans', 'teacher_pretrained_path': '--teacher-checkpoint',
    'teacher_pretrained': '--teacher-pretrained', 'temperature': '--kd-temperature',
}
_CALL = re.compile(r'[\w.]+\((?:[^()]|\([^()]*\))*\)')  # code in a message, e.g. timm.create_model(name, img_size=64)


def in_flag_words(message: str) -> str:
    """``message`` with the library's parameter names as the command line's flags: ``img_size=64`` ->
    ``--img-size 64``, ``student_stages`` -> ``--distill-stages``, ``cam_weight`` -> ``--sa-cam-weight``; code
    quoted in it stays as it is. An SA option that is also an English word (``backend``, ``tau``) is a flag only in
    a message that speaks in parameters (one given a value, ``tau=4``, or a snake_case one): "no such compile
    backend" is not about ``--sa-backend``."""
    from ..losses import loss_options
    from .distill_flags import loss_flag
    sa_words = {name: loss_flag('sa', name) for name in loss_options('sa').options}
    words = {**PARAMETER_FLAGS, **{k: v for k, v in sa_words.items() if '_' in k}}
    valued = {**words, **sa_words}

    def pattern_of(names, value_required: bool) -> re.Pattern:
        value = r'=([^\s,;)]+)' if value_required else r'(?:=([^\s,;)]+))?'
        return re.compile(r'(?<![\w\-\'])(' + '|'.join(sorted(names, key=len, reverse=True)) + r')' + value + r'(?![\w\'])')

    speaks_parameters = pattern_of(valued, True).search(message) or pattern_of(words, False).search(message)
    patterns = (pattern_of(valued, True), pattern_of(valued if speaks_parameters else words, False))

    def flag(match: re.Match) -> str:
        value = match.group(2)
        if value is None:
            return valued[match.group(1)]
        core = value.rstrip('.')  # the full stop ends the sentence, not the value
        return f"{valued[match.group(1)]} {core}{value[len(core):]}"

    def translate(text: str) -> str:
        for pattern in patterns:
            text = pattern.sub(flag, text)
        return text

    pieces, start = [], 0
    for call in _CALL.finditer(message):
        pieces += [translate(message[start:call.start()]), call.group(0)]
        start = call.end()
    return ''.join(pieces + [translate(message[start:])])


def run_command(prog: str, body: Callable[[], int]) -> int:
    """Run ``body``; a user error (`USER_ERRORS`) becomes one ``<prog>: error: ...`` line on stderr and exit status 2,
    in the command line's words (`in_flag_words`); Ctrl-C one ``<prog>: interrupted...`` line (with what the
    KeyboardInterrupt says, e.g. how to continue the run) and `INTERRUPTED_STATUS`; SIGTERM is handled as Ctrl-C is
    (`timm_sadistill._termination`), its line ``<prog>: terminated (SIGTERM)...`` and its status `TERMINATED_STATUS`.

    Any other exception propagates: it is a bug, and its traceback is what a report needs.
    """
    try:
        with sigterm_interrupts() as terminated:
            return body()
    except USER_ERRORS as e:
        if isinstance(e, UsageError) and e.option is not None:
            from .distill_flags import option_flag
            message = e.worded(option_flag(e.option, e.loss), ' ').splitlines()[0]
        else:
            message = in_flag_words(str(e).splitlines()[0] if str(e).strip() else type(e).__name__)
        sys.stderr.write(f"{prog}: error: {message}\n")
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (`timm_sadistill._termination`): the same clean-up
        how = 'terminated (SIGTERM)' if terminated else 'interrupted'
        said = str(e).splitlines()[0] if str(e).strip() and not isinstance(e, Terminated) else ''
        sys.stderr.write(f"{prog}: {how}" + (f": {said}" if said else '.') + '\n')
        return TERMINATED_STATUS if terminated else INTERRUPTED_STATUS
