"""The first-use check of ``backend='auto'``: a Triton kernel variant proves itself once per process before it is
trusted.

The Triton kernels have been compiled for sm_80 / sm_90 and run in the interpreter, but a given user's GPU, driver
and triton version may be the first to run a variant. So the first call for each key (op, device, dtypes, layouts,
channel and position counts, p == 2: what fixes the compiled kernel and its launch) also runs the op on the first
sample with Triton and with the PyTorch formulas and compares them (tolerance by dtype). A compile or launch error
or a mismatch gives one warning naming the op, the shapes and the error, and the PyTorch formulas serve that key for
the rest of the process. After the first call a key costs one dict lookup, and nothing synchronises the device.

``strict`` (``backend='triton'``) skips the check: errors raise, as asked.
"""
import warnings
from typing import Callable, Dict, Hashable, Optional, Sequence, Tuple, Union

import torch

__all__ = ['checked_call', 'forget']

Outputs = Union[torch.Tensor, Tuple[torch.Tensor, ...]]

# key -> True (Triton agreed with the PyTorch formulas) or False (the PyTorch formulas from now on)
_VERDICTS: Dict[Hashable, bool] = {}
# relative tolerance of Triton against the PyTorch formulas, by the dtype of the compared output: float32 values
# agree to accumulation order, fp16/bf16 outputs (ds) to the rounding of the input dtype
_RTOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float64: 1e-3}


def forget() -> None:
    """Drop every verdict: the next call of each key is checked again (for tests)."""
    _VERDICTS.clear()


def _as_tuple(outputs: Outputs) -> Tuple[torch.Tensor, ...]:
    return outputs if isinstance(outputs, tuple) else (outputs,)


def _mismatch(got: Outputs, expected: Outputs) -> Optional[str]:
    """None when every output agrees, else which one and by how much."""
    for i, (g, e) in enumerate(zip(_as_tuple(got), _as_tuple(expected))):
        if g.shape != e.shape or g.dtype != e.dtype:
            return f'output {i} is {g.dtype} {tuple(g.shape)}, expected {e.dtype} {tuple(e.shape)}'
        rtol = _RTOL[e.dtype]
        g, e = g.float(), e.float()
        # the floor covers values that are 0 up to rounding (the projected-out part of a map's gradient)
        atol = rtol * float(e.abs().max()) + 1e-6 if e.numel() else 0.0
        if not torch.allclose(g, e, rtol=rtol, atol=atol, equal_nan=True):
            err = float((g - e).abs().max())
            return f'output {i} differs by up to {err:.3g} (tolerance {atol:.3g} + {rtol:g} x |expected|)'
    return None


def _describe(args: Sequence) -> str:
    """'cuda:0: s torch.bfloat16 (64, 256, 56, 56) channels-last, ...' of the tensor arguments."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    parts = []
    for a in tensors:
        layout = 'channels-last' if a.dim() == 4 and a.is_contiguous(memory_format=torch.channels_last) \
            and not a.is_contiguous() else 'contiguous' if a.is_contiguous() else f'strides {a.stride()}'
        parts.append(f'{str(a.dtype)[6:]} {tuple(a.shape)} {layout}')
    return f"{tensors[0].device if tensors else '?'} ({'; '.join(parts)})"


def checked_call(
        op: str,
        key: Hashable,
        strict: bool,
        triton_fn: Callable[..., Outputs],
        torch_fn: Callable[..., Outputs],
        args: tuple,
        first_sample: Callable[[tuple], tuple],
) -> Outputs:
    """``triton_fn(*args)``, behind the first-use check of ``key`` unless ``strict``.

    Args:
        op: the op's name, for the warning.
        key: what fixes the kernel variant (with the device).
        triton_fn, torch_fn: the two implementations, same arguments and outputs.
        args: their arguments.
        first_sample: args -> the same arguments cut to the first sample (the kernel variant unchanged).
    """
    if strict:
        return triton_fn(*args)
    verdict = _VERDICTS.get(key)
    if verdict:
        return triton_fn(*args)
    if verdict is False:
        return torch_fn(*args)
    try:
        sample = first_sample(args)
        problem = _mismatch(triton_fn(*sample), torch_fn(*sample))
        if problem is None:
            outputs = triton_fn(*args)
    except Exception as e:  # a compile or launch failure of a kernel this GPU never ran: fall back, said once
        problem = f'{type(e).__name__}: {e}'
    _VERDICTS[key] = problem is None
    if problem is None:
        return outputs
    warnings.warn(
        f"timm_sadistill.ops.{op}: the Triton kernel failed its first-use check on {_describe(args)}: {problem}. "
        f"The PyTorch implementation serves these inputs for the rest of the process (backend='torch' uses it "
        f"everywhere; backend='triton' raises instead).",
        RuntimeWarning, stacklevel=2,
    )
    return torch_fn(*args)
