"""A cheap readability check for checkpoint files, so a truncated or corrupted file gets a clear error.

Telling "cannot be read" apart from "does not fit the model" matters: the fixes differ (another file vs another
architecture or class count), and load_state_dict errors alone do not say which it is.
"""
import argparse
import os
import pickle
import re
import zipfile
from typing import Any

import torch

from .errors import UsageError

__all__ = ['CheckpointReadError', 'check_checkpoint_readable', 'load_checkpoint', 'state_dict_mismatch']

_ZIP_MAGIC = b'PK\x03\x04'  # torch.save's default format is a zip archive


class CheckpointReadError(UsageError):
    """A checkpoint file is missing, truncated or not a checkpoint: the user's file, so a `UsageError`."""


def check_checkpoint_readable(path: str, what: str = 'Checkpoint') -> Any:
    """Raise `CheckpointReadError` unless ``path`` is a complete safetensors file or torch zip archive; the torch
    checkpoint's contents as `load_checkpoint` reads them (None for safetensors), so a caller reads it once.

    Reads only headers (the safetensors metadata, the zip central directory and the pickled structure, which must
    be weights only: a pickle that could run code is refused), never the tensors; a legacy (non-zip) torch pickle
    cannot be memory-mapped, and is loaded whole (weights only) to be checked.
    """
    if os.path.isdir(path):
        raise CheckpointReadError(f"{what} '{path}' is a folder, not a checkpoint file; pass a file in it, "
                                  "e.g. model.safetensors or last.pth.tar.")
    if not os.path.isfile(path):
        raise CheckpointReadError(f"{what} '{path}' does not exist; pass the path of an existing checkpoint file.")
    try:
        with open(path, 'rb') as f:
            magic = f.read(4)
        if magic == _ZIP_MAGIC:
            with zipfile.ZipFile(path) as archive:
                archive.infolist()
        elif path.endswith('.safetensors'):
            from safetensors import safe_open
            with safe_open(path, framework='pt') as f:
                f.keys()
    except Exception as e:  # zipfile, safetensors and the OS raise unrelated types for the same problem
        raise CheckpointReadError(
            f"{what} '{path}' cannot be read: it is truncated or not a checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:160]}). Pass another file, e.g. model_best.pth.tar or an earlier "
            "checkpoint-N.pth.tar from the same folder."
        ) from e
    if path.endswith('.safetensors'):
        return None
    return load_checkpoint(path, what)  # timm and torch.load would refuse a pickle with code in it as a traceback


def _is_zip(path: str) -> bool:
    """Whether ``path`` is in torch.save's zip format (the legacy pickle format cannot be memory-mapped)."""
    with open(path, 'rb') as f:
        return f.read(4) == _ZIP_MAGIC


def _holds_code(what: str, path: str, error: pickle.UnpicklingError) -> str:
    """The one line for a checkpoint that torch's weights-only loader refused: what it holds, and what to do."""
    found = re.search(r'GLOBAL ([\w.]+)', str(error))
    held = f'a pickled {found.group(1)}' if found else 'pickled objects'
    return (f"{what} '{path}' was not loaded: it holds more than weights ({held}), and loading it could run code. "
            "Pass a safetensors file or plain weights; if you trust the file, re-save its weights, e.g. "
            "torch.save(torch.load(path, weights_only=False)['state_dict'], 'weights.pth').")


def load_checkpoint(path: str, what: str = 'Checkpoint') -> Any:
    """``torch.load`` of a timm checkpoint, memory-mapped (only its structure is read until a tensor is used),
    weights only.

    weights_only refuses arbitrary objects, here as `CheckpointReadError` naming what the file holds; train
    checkpoints also hold the run's argparse.Namespace ('args'), which timm's own loader allow-lists the same way.
    """
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as e:
        raise CheckpointReadError(_holds_code(what, path, e)) from None


def state_dict_mismatch(error: RuntimeError, limit: int = 240) -> str:
    """The line of a ``load_state_dict`` error that names the offending key and shapes, cut to ``limit`` characters.

    Its first line is only a header ("Error(s) in loading state_dict for ResNet:"), and a missing-key list can run
    for pages.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(error).__name__)
    return detail if len(detail) <= limit else detail[:limit] + ' ...'
