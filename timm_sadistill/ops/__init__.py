"""Spatial ops (the attention map of AT and SA, the spatial KL of CWD and SA, both at once for SA) with a fused Triton path and a plain PyTorch fallback.

Every op takes ``backend='auto' | 'triton' | 'torch'``. ``auto`` runs the Triton kernels for CUDA tensors
when triton imports and PyTorch otherwise; ``triton`` also runs CPU tensors when ``TRITON_INTERPRET=1``
was set before triton was first imported (that is how CI checks the kernels).

Layout: `spatial_triton` holds the kernels and their launchers, `spatial_custom_ops` the ``torch.library`` custom ops
over them (opaque to ``torch.compile``, with their autograd), this module the dispatch, and `reference` the
PyTorch formulas, the test oracle. Under ``auto`` each kernel variant is checked against the PyTorch formulas on its
first call (`_first_use`): one that fails warns once and falls back; ``triton`` raises instead.
"""
import os
from typing import Tuple

import torch

from ..errors import UsageError
from . import reference

__all__ = ['spatial_attention', 'spatial_kl', 'spatial_kl_and_attention', 'triton_available', 'BACKENDS']

BACKENDS = ('auto', 'triton', 'torch')
# what the Triton kernels read; float64 (gradcheck) stays on the reference
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _import_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# read once: a traced step (torch.compile) sees a constant, not an import
_TRITON_AVAILABLE = _import_triton()


def triton_available() -> bool:
    return _TRITON_AVAILABLE


def _is_cuda(x: torch.Tensor) -> bool:
    # auto's device test, one function so that the CPU tests can make auto pick the kernels (in the interpreter)
    return x.is_cuda


def _use_triton(backend: str, x: torch.Tensor, *others: torch.Tensor) -> bool:
    if backend not in BACKENDS:
        raise UsageError(f"Unknown backend '{backend}'; use one of {', '.join(BACKENDS)}.")
    if backend == 'torch':
        return False
    if backend == 'auto':
        return _is_cuda(x) and all(y.dtype in TRITON_DTYPES for y in (x, *others)) and triton_available()
    for y in (x, *others):
        if y.dtype not in TRITON_DTYPES:
            raise UsageError(
                f"backend='triton' supports {', '.join(str(d) for d in TRITON_DTYPES)}, got {y.dtype}; "
                "use backend='torch' for it."
            )
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package; install it or use backend='torch'.")
    if not x.is_cuda and os.environ.get('TRITON_INTERPRET') != '1':
        raise RuntimeError(
            f"backend='triton' got a tensor on {x.device}; move it to CUDA, or set TRITON_INTERPRET=1 before "
            "triton is first imported to run the kernels on the CPU, or use backend='torch'."
        )
    return True


def _check_features(name: str, x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise UsageError(f"{name} must be a (B, C, H, W) feature map, got shape {tuple(x.shape)}.")
    if not x.is_floating_point():
        raise UsageError(f"{name} must be a floating point tensor (float32, float16, bfloat16 or float64), got {x.dtype}.")
    if x.numel() == 0:
        raise UsageError(f"{name} must be non-empty, got shape {tuple(x.shape)}.")


def _check_positive(**params: float) -> None:
    for name, value in params.items():
        if not value > 0:
            raise UsageError(f"{name} must be > 0, got {value}.")


def _check_pair(s: torch.Tensor, t: torch.Tensor) -> None:
    _check_features('s', s)
    _check_features('t', t)
    if s.shape != t.shape:
        raise UsageError(
            f"s and t must have the same shape, got s {tuple(s.shape)} and t {tuple(t.shape)}; "
            "project and resize the student features to the teacher's (a connector) first."
        )
    if s.device != t.device:
        raise UsageError(f"s and t must be on the same device, got s on {s.device} and t on {t.device}.")


def spatial_attention(x: torch.Tensor, p: float = 2.0, backend: str = 'auto') -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W): mean_c |x|^p, L2-normalised over positions (float32)."""
    _check_features('x', x)
    _check_positive(p=p)
    if _use_triton(backend, x):
        from . import spatial_custom_ops
        return spatial_custom_ops.spatial_attention(x, p, strict=backend == 'triton')
    return reference.spatial_attention(x, p)


def spatial_kl(s: torch.Tensor, t: torch.Tensor, tau: float = 4.0, backend: str = 'auto') -> torch.Tensor:
    """Scalar tau^2/(B*C) * sum_{b,c} KL(softmax(t_bc/tau) || softmax(s_bc/tau)) over H*W positions; t takes no
    gradient on the Triton path."""
    _check_pair(s, t)
    _check_positive(tau=tau)
    if _use_triton(backend, s, t):
        from . import spatial_custom_ops
        return spatial_custom_ops.spatial_kl(s, t, tau, strict=backend == 'triton')
    return reference.spatial_kl(s, t, tau)


def spatial_kl_and_attention(
        s: torch.Tensor,
        t: torch.Tensor,
        tau: float = 4.0,
        p: float = 2.0,
        backend: str = 'auto',
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(L_dist, L_att) of one stage pair from one pass over s and t; t takes no gradient on the Triton path."""
    _check_pair(s, t)
    _check_positive(tau=tau, p=p)
    if _use_triton(backend, s, t):
        from . import spatial_custom_ops
        return spatial_custom_ops.spatial_kl_and_attention(s, t, tau, p, strict=backend == 'triton')
    return reference.spatial_kl_and_attention(s, t, tau, p)

