"""The checks of a device name and an input size, which ``train``, ``viz`` and ``stages`` take alike: each mistake one
line that names the flag."""
from typing import Optional, Tuple

import torch

from .errors import UsageError

__all__ = ['check_device', 'check_img_size']


def check_img_size(img_size: Optional[int], flag: str = '--img-size') -> Optional[Tuple[int, int]]:
    """(N, N) for ``--img-size N``, None when not given; UsageError for N <= 0 (timm would take the model's default
    without a word)."""
    if img_size is None:
        return None
    if img_size <= 0:
        raise UsageError(f"{flag} {img_size}: the input size is a positive number of pixels, e.g. {flag} 224.")
    return img_size, img_size


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
