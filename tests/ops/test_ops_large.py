"""Every registered op against its PyTorch formula at training-scale shapes (GPU only): values and gradients, B 256,
C 2048, 56 x 56 (1.6 G elements a tensor: 64-bit offsets, thousands of channel blocks) in four dtype and layout
cases, and ResNet-50's last stage (7 x 7) in every dtype and layout.

The reference keeps B x C x N float32 temporaries for its backward, which at (256, 2048, 56, 56) would need
tens of GB, so it runs on ``CHUNK`` samples at a time. Every op is a batch mean (or, for the maps, a per-sample
quantity), so the whole-batch values are the chunks' values weighted by chunk / B and summed, and each chunk's
gradient is the whole batch's gradient of its samples: `test_chunked_reference_is_the_whole_batch_reference`
checks that on the CPU, and `test_compare_runs_at_a_small_shape` runs the very comparison of the GPU tests at a
small shape (kernels in the interpreter), so the GPU-only tests hold no code that never ran.

    TRITON_INTERPRET=0 python -m pytest -q tests/ops/test_ops_large.py     # on a GPU (benchmarks/gpu_check.sh)
"""
from typing import Callable, List, Sequence, Tuple

import pytest
import torch

from timm_sadistill import ops
from timm_sadistill.ops import reference

# the small-shape tests' tolerances, gradient check and the losses they backpropagate: the same claims, only the
# shapes differ
from test_ops import (DTYPES, FUSED, LAYOUTS, LOSS_RTOL, SPECS, WEIGHTS,  # noqa: E402 (tests/ is on sys.path)
                      _assert_grad_close)

DEVICE = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
gpu_only = pytest.mark.skipif(DEVICE.type != 'cuda', reason='training-scale shapes need a GPU')

BIG = (256, 2048, 56, 56)  # B, C and H*W each at its training-scale maximum (ResNet-50's), all at once
LAST_STAGE = (256, 2048, 7, 7)  # ResNet-50's last stage: 49 positions, masked tails at full B and C
# BIG in four (dtype, layout) cases an op (both layouts in the half types); LAST_STAGE in every one
BIG_CASES = [(torch.float32, 'contiguous'), (torch.float16, 'channels_last'), (torch.bfloat16, 'contiguous'),
             (torch.bfloat16, 'channels_last')]
CHUNK = 32  # reference samples at a time: 0.8 GB per float32 temporary at BIG

# an op under test: (s, t) -> (its outputs, the scalar to backpropagate)
Run = Callable[[torch.Tensor, torch.Tensor], Tuple[Sequence[torch.Tensor], torch.Tensor]]
# its reference on chunk `index` of the batch, with weight chunk / B
RefRun = Callable[[slice, torch.Tensor, torch.Tensor, float], Tuple[Sequence[torch.Tensor], torch.Tensor]]


def _features(shape, dtype, layout, seed=0):
    """test_ops' features (a teacher correlated with the student), drawn on the device: 1.6 G values on the CPU
    would take longer than the test."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    s = torch.randn(shape, generator=g, device=DEVICE).mul_(2.0)
    t = torch.randn(shape, generator=g, device=DEVICE).mul_(1.5).add_(s, alpha=0.7)
    memory_format = torch.channels_last if layout == 'channels_last' else torch.contiguous_format
    return s.to(dtype, memory_format=memory_format), t.to(dtype, memory_format=memory_format)


def _as_tuple(outputs) -> Tuple[torch.Tensor, ...]:
    return outputs if isinstance(outputs, tuple) else (outputs,)


def _ops(name: str, batch: int, device: torch.device) -> Tuple[Run, RefRun]:
    """The Triton op ``name`` and its chunked reference, each returning (outputs, loss to backpropagate).

    Every scalar output is a batch mean, so a chunk's is weighted by chunk / B; every other output is per sample,
    taken against a fixed upstream gradient g of shape (B, 1), sliced like the samples."""
    targets = len(SPECS[name].tensors) - 1  # the teacher t for each feature map after the student's
    g = torch.randn(batch, 1, generator=torch.Generator().manual_seed(1)).to(device)

    def loss(outputs, weight, index):
        return sum(weight * w * o if o.dim() == 0 else (o * g[index]).sum() for o, w in zip(outputs, WEIGHTS))

    def run(s, t):
        outputs = _as_tuple(getattr(ops, name)(s, *[t] * targets, backend='triton'))
        return outputs, loss(outputs, 1.0, slice(None))

    def ref(index, s, t, weight):
        outputs = _as_tuple(getattr(reference, name)(s, *[t] * targets))
        return [weight * o if o.dim() == 0 else o for o in outputs], loss(outputs, weight, index)
    return run, ref


def _chunked_reference(ref: RefRun, s: torch.Tensor, t: torch.Tensor, chunk: int, dtype=torch.float32):
    """Yield (samples, outputs, gradient of s) of the reference on s and t upcast to ``dtype``, ``chunk`` samples
    at a time."""
    batch = s.shape[0]
    for start in range(0, batch, chunk):
        index = slice(start, start + chunk)
        s_ref = s[index].detach().to(dtype).requires_grad_()
        outputs, loss = ref(index, s_ref, t[index].to(dtype), s_ref.shape[0] / batch)
        loss.backward()
        yield index, [o.detach() for o in outputs], s_ref.grad


def _combine(parts: List[List[torch.Tensor]]) -> List[torch.Tensor]:
    """The chunks' weighted scalars summed, their per-sample outputs concatenated."""
    return [torch.stack(p).sum() if p[0].dim() == 0 else torch.cat(p) for p in zip(*parts)]


def _compare(name: str, shape, dtype, layout, chunk: int = CHUNK) -> None:
    """Triton vs the chunked reference: the outputs, then the gradient chunk by chunk (its dtype and strides too)."""
    s, t = _features(shape, dtype, layout)
    run, ref = _ops(name, shape[0], DEVICE)
    s_tri = s.detach().requires_grad_()
    outputs, loss = run(s_tri, t)
    loss.backward()
    assert s_tri.grad.dtype == dtype and s_tri.grad.stride() == s.stride()
    parts = []
    for index, ref_outputs, ref_grad in _chunked_reference(ref, s, t, chunk):
        _assert_grad_close(s_tri.grad[index], ref_grad, dtype)
        parts.append(ref_outputs)
    for got, expected in zip(outputs, _combine(parts)):
        torch.testing.assert_close(got, expected, rtol=LOSS_RTOL, atol=1e-6)


@gpu_only
@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('name', FUSED)
def test_op_last_stage(name, dtype, layout):
    _compare(name, LAST_STAGE, dtype, layout)


@gpu_only
@pytest.mark.parametrize('dtype, layout', BIG_CASES, ids=lambda case: str(case).replace('torch.', ''))
@pytest.mark.parametrize('name', FUSED)
def test_op_big(name, dtype, layout):
    _compare(name, BIG, dtype, layout)


@pytest.mark.parametrize('name', FUSED)
def test_chunked_reference_is_the_whole_batch_reference(name):
    shape = (5, 6, 7, 9)  # 5 samples in chunks of 2: an uneven last chunk
    s, t = (x.double() for x in _features(shape, torch.float32, 'contiguous'))
    _, ref = _ops(name, shape[0], DEVICE)
    s_whole = s.clone().requires_grad_()
    whole, loss = ref(slice(None), s_whole, t, 1.0)
    loss.backward()
    chunks = list(_chunked_reference(ref, s, t, 2, dtype=torch.float64))
    for got, expected in zip(_combine([outputs for _, outputs, _ in chunks]), whole):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.cat([grad for _, _, grad in chunks]), s_whole.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize('name', FUSED)
def test_compare_runs_at_a_small_shape(name):
    # bfloat16 channels-last: the loosest gradient tolerance and the strided layout, through the same code
    _compare(name, (5, 70, 11, 13), torch.bfloat16, 'channels_last', chunk=2)
