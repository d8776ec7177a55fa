"""The Triton SA ops against the PyTorch reference at training-scale shapes (GPU only): values and gradients, every
dtype and layout, B 256, C 2048, 56 x 56 (1.6 G elements a tensor: 64-bit offsets, thousands of channel blocks).

The reference keeps B x C x N float32 temporaries for its backward, which at (256, 2048, 56, 56) would need
tens of GB, so it runs on ``CHUNK`` samples at a time. Every op is a batch mean (or, for the maps, a per-sample
quantity), so the whole-batch values are the chunks' values weighted by chunk / B and summed, and each chunk's
gradient is the whole batch's gradient of its samples: `test_chunked_reference_is_the_whole_batch_reference`
checks that on the CPU, and `test_compare_runs_at_a_small_shape` runs the very comparison of the GPU tests at a
small shape (kernels in the interpreter), so the GPU-only tests hold no code that never ran.

    TRITON_INTERPRET=0 python -m pytest -q tests/test_ops_large.py     # on a GPU (benchmarks/gpu_check.sh)
"""
from typing import Callable, List, Sequence, Tuple

import pytest
import torch

from timm_sadistill import ops
from timm_sadistill.ops import reference

# the small-shape tests' tolerances and gradient check: the same claims, only the shapes differ
from test_ops import DTYPES, LAYOUTS, LOSS_RTOL, _assert_grad_close  # noqa: E402 (tests/ is on sys.path)

DEVICE = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
gpu_only = pytest.mark.skipif(DEVICE.type != 'cuda', reason='training-scale shapes need a GPU')

BIG = (256, 2048, 56, 56)  # B, C and H*W each at its training-scale maximum (ResNet-50's), all at once
LARGE_SHAPES = [BIG, (256, 2048, 7, 7)]  # and ResNet-50's last stage: 49 positions, masked tails at full B and C
CHUNK = 32  # reference samples at a time: 0.8 GB per float32 temporary at BIG
TAU, P = 4.0, 2.0

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


def _ops(name: str, batch: int, device: torch.device) -> Tuple[Run, RefRun]:
    """The Triton op ``name`` and its chunked reference, each returning (outputs, loss to backpropagate)."""
    if name == 'spatial_kl_and_attention':
        def run(s, t):
            dist, att = ops.spatial_kl_and_attention(s, t, TAU, P, backend='triton')
            return (dist, att), 0.7 * dist + 1.3 * att

        def ref(index, s, t, weight):
            dist, att = reference.spatial_kl_and_attention(s, t, TAU, P)
            return (weight * dist, weight * att), weight * (0.7 * dist + 1.3 * att)
    elif name == 'spatial_kl':
        def run(s, t):
            kl = ops.spatial_kl(s, t, TAU, backend='triton')
            return (kl,), 3.0 * kl

        def ref(index, s, t, weight):
            kl = weight * reference.spatial_kl(s, t, TAU)
            return (kl,), 3.0 * kl
    else:
        # maps are per sample: a fixed upstream gradient g, sliced like the samples
        g = torch.randn(batch, 1, generator=torch.Generator().manual_seed(1)).to(device)

        def run(s, t):
            a = ops.spatial_attention(s, P, backend='triton')
            return (a,), (a * g).sum()

        def ref(index, s, t, weight):
            a = reference.spatial_attention(s, P)
            return (a,), (a * g[index]).sum()
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
@pytest.mark.parametrize('shape', LARGE_SHAPES, ids=lambda s: 'x'.join(map(str, s)))
@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('layout', LAYOUTS)
def test_sa_loss_terms_large(shape, dtype, layout):
    _compare('spatial_kl_and_attention', shape, dtype, layout)


@gpu_only
@pytest.mark.parametrize('name', ['spatial_kl', 'spatial_attention'])
@pytest.mark.parametrize('dtype', DTYPES)
def test_other_ops_large(name, dtype):
    # one layout a dtype, as test_ops does for these: spatial_kl_and_attention above covers every combination
    _compare(name, BIG, dtype, 'channels_last' if dtype == torch.bfloat16 else 'contiguous')


@pytest.mark.parametrize('name', ['spatial_kl_and_attention', 'spatial_kl', 'spatial_attention'])
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


@pytest.mark.parametrize('name', ['spatial_kl_and_attention', 'spatial_kl', 'spatial_attention'])
def test_compare_runs_at_a_small_shape(name):
    # bfloat16 channels-last: the loosest gradient tolerance and the strided layout, through the same code
    _compare(name, (5, 70, 11, 13), torch.bfloat16, 'channels_last', chunk=2)
