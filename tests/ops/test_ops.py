"""Every registered fused op (`timm_sadistill.ops.op_registry`) against its PyTorch formula (`ops.reference`): values
and gradients over dtypes, layouts and odd shapes, the teacher taking no gradient, a deterministic forward, which
path ``backend='auto'`` takes, and the dispatcher's errors. The ops and their arguments come from the registry and
the formulas' declarations, so a new op is tested here with no edit; its own claims live in its
``tests/ops/test_ops_<family>.py``.

On a CPU machine the Triton kernels run in the interpreter (TRITON_INTERPRET=1, see conftest.py); with a GPU
and TRITON_INTERPRET=0 the same tests run them compiled on CUDA tensors.
"""
import sys
from typing import List, Sequence, Tuple

import pytest
import torch

from timm_sadistill import UsageError, ops
from timm_sadistill.ops import dispatch, op_registry, reference

DEVICE = torch.device('cuda' if torch.cuda.is_available() else 'cpu')

# Triton on low-precision inputs vs the reference on the same values upcast: both accumulate in float32, so
# the losses agree to float32 rounding; ds is rounded to the input dtype (half an ulp: 2^-11 fp16, 2^-8 bf16).
LOSS_RTOL = 1e-4
GRAD_RTOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}

SHAPES = [
    (3, 5, 7, 9),  # odd sizes, masked tails on both axes
    (2, 70, 11, 13),  # several channel blocks and position blocks in both layouts
    (2, 1, 6, 5),  # C = 1
    (2, 3, 1, 1),  # 1x1 maps
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ['contiguous', 'channels_last']
# the registered ops, and the declaration (argument names, defaults, feature maps) of each
FUSED = sorted(op_registry.fused_ops())
SPECS = dispatch.op_specs()
# weights of an op's scalar outputs in the loss its gradient is checked on (distinct, so a swapped gradient shows)
WEIGHTS = (0.7, 1.3, 2.1)


def _features(shape, dtype=torch.float32, layout='contiguous', seed=0):
    g = torch.Generator().manual_seed(seed)
    s = 2.0 * torch.randn(shape, generator=g)
    # a teacher correlated with the student, as after some training, plus its own structure
    t = 0.7 * s + 1.5 * torch.randn(shape, generator=g)
    s, t = s.to(DEVICE, dtype), t.to(DEVICE, dtype)
    if layout == 'channels_last':
        s, t = s.to(memory_format=torch.channels_last), t.to(memory_format=torch.channels_last)
    return s, t


def _leaf(x, dtype=None):
    return x.detach().to(dtype or x.dtype).requires_grad_()


def _assert_grad_close(got, ref, dtype):
    rtol = GRAD_RTOL[dtype]
    # the floor covers gradients that are 0 up to rounding, e.g. through the normalisation of a 1x1 map
    torch.testing.assert_close(got.float(), ref, rtol=rtol, atol=rtol * ref.abs().max().item() + 1e-7)


def op_maps(name: str, shape, dtype=torch.float32, layout='contiguous', seed=0) -> List[torch.Tensor]:
    """The op's feature maps: the student first, then the teacher (`_features`) for each further one."""
    s, t = _features(shape, dtype, layout, seed)
    return [s] + [t] * (len(SPECS[name].tensors) - 1)


def as_tuple(outputs) -> Tuple[torch.Tensor, ...]:
    return outputs if isinstance(outputs, tuple) else (outputs,)


def weighted_loss(outputs: Sequence[torch.Tensor], upstream: Sequence[torch.Tensor]) -> torch.Tensor:
    """A scalar of every output: scalars weighted by WEIGHTS, per-sample outputs against a fixed upstream gradient."""
    return sum(w * o if o.dim() == 0 else (o * g).sum() for o, w, g in zip(outputs, WEIGHTS, upstream))


def upstream_for(outputs: Sequence[torch.Tensor], seed=1) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=g).to(o.device) for o in outputs]


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('name', FUSED)
def test_op_matches_reference(name, shape, dtype, layout):
    maps = op_maps(name, shape, dtype, layout)
    s_tri, s_ref = _leaf(maps[0]), _leaf(maps[0], torch.float32)
    got = as_tuple(getattr(ops, name)(s_tri, *maps[1:], backend='triton'))
    expected = as_tuple(getattr(reference, name)(s_ref, *(m.float() for m in maps[1:])))
    assert [(o.shape, o.dtype) for o in got] == [(o.shape, o.dtype) for o in expected]
    for o, e in zip(got, expected):
        torch.testing.assert_close(o, e, rtol=LOSS_RTOL, atol=1e-6)

    upstream = upstream_for(got)
    weighted_loss(got, upstream).backward()
    weighted_loss(expected, upstream).backward()
    assert s_tri.grad.dtype == dtype
    assert s_tri.grad.stride() == maps[0].stride()
    _assert_grad_close(s_tri.grad, s_ref.grad, dtype)


@pytest.mark.parametrize('name', [n for n in FUSED if len(SPECS[n].tensors) > 1])
def test_teacher_takes_no_gradient(name):
    maps = [_leaf(m) for m in op_maps(name, (2, 4, 3, 5))]
    outputs = as_tuple(getattr(ops, name)(*maps, backend='triton'))
    weighted_loss(outputs, upstream_for(outputs)).backward()
    assert maps[0].grad is not None and maps[0].grad.abs().sum() > 0
    assert all(m.grad is None for m in maps[1:])


@pytest.mark.parametrize('name', FUSED)
def test_forward_is_deterministic(name):
    maps = op_maps(name, (2, 70, 5, 5))
    first = as_tuple(getattr(ops, name)(*maps, backend='triton'))
    second = as_tuple(getattr(ops, name)(*maps, backend='triton'))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_each_triton_entry_takes_its_formulas_arguments():
    """A registered Triton path is named for a formula of `reference` and takes its arguments (names, defaults)
    plus ``strict``: the dispatcher passes them by position."""
    import inspect
    for name, op in op_registry.fused_ops().items():
        assert name in reference.__all__, f'{op.module}.{name} has no formula in ops/reference.py'
        params = list(inspect.signature(op.triton).parameters.values())
        formula = inspect.signature(getattr(reference, name)).parameters.values()
        assert [(p.name, p.default) for p in params[:-1]] == [(p.name, p.default) for p in formula]
        assert params[-1].name == 'strict'


@pytest.mark.parametrize('name', FUSED)
def test_auto_on_cpu_runs_the_reference(name, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError('backend=auto ran a Triton kernel on CPU tensors')

    op = op_registry.fused_ops()[name]
    for kernel in op.kernels:  # every launch of the op goes through one of its registered kernels
        monkeypatch.setattr(sys.modules[op.module], kernel, fail)
    maps = [m.cpu() for m in op_maps(name, (2, 3, 4, 5))]
    got, expected = as_tuple(getattr(ops, name)(*maps)), as_tuple(getattr(reference, name)(*maps))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.skipif(DEVICE.type != 'cuda', reason='auto picks Triton only for CUDA tensors')
@pytest.mark.parametrize('name', FUSED)
def test_auto_on_cuda_runs_triton(name):
    maps = op_maps(name, (2, 5, 7, 9), torch.bfloat16)
    got = as_tuple(getattr(ops, name)(*maps))
    assert all(torch.equal(a, b) for a, b in zip(got, as_tuple(getattr(ops, name)(*maps, backend='triton'))))
    # float64 has no kernel: auto falls back to the reference
    maps64 = [m.double() for m in maps]
    got = as_tuple(getattr(ops, name)(*maps64))
    assert all(torch.equal(a, b) for a, b in zip(got, as_tuple(getattr(reference, name)(*maps64))))


def test_errors_name_the_expected_value(monkeypatch):
    s, t = _features((2, 3, 4, 5))
    with pytest.raises(UsageError, match="Unknown backend 'bogus'; use one of auto, triton, torch"):
        ops.spatial_kl_and_attention(s, t, backend='bogus')
    with pytest.raises(UsageError, match=r'same shape, got s \(2, 3, 4, 5\) and t \(2, 3, 4, 6\)'):
        ops.spatial_kl(s, torch.zeros(2, 3, 4, 6, device=DEVICE))
    with pytest.raises(UsageError, match='floating point tensor .* got torch.int64'):
        ops.spatial_attention(torch.ones(2, 3, 4, 5, dtype=torch.long))
    with pytest.raises(UsageError, match=r'\(B, C, H, W\) feature map, got shape \(3, 4, 5\)'):
        ops.spatial_attention(s[0])
    with pytest.raises(UsageError, match='supports torch.float32, torch.float16, torch.bfloat16, got torch.float64'):
        ops.spatial_kl_and_attention(s.double(), t.double(), backend='triton')
    with pytest.raises(UsageError, match='tau must be > 0, got 0'):
        ops.spatial_kl(s, t, tau=0)
    with pytest.raises(UsageError, match='p must be > 0, got -1'):
        ops.spatial_kl_and_attention(s, t, p=-1)
    with pytest.raises(TypeError, match="unexpected argument 'q'"):
        ops.spatial_attention(s, q=2.0)
    with pytest.raises(TypeError, match="multiple values for the argument 'tau'"):
        ops.spatial_kl(s, t, 2.0, tau=2.0)
    monkeypatch.setenv('TRITON_INTERPRET', '0')
    with pytest.raises(RuntimeError, match='got a tensor on cpu; move it to CUDA'):
        ops.spatial_attention(s.cpu(), backend='triton')


def test_public_ops_keep_their_positional_arguments():
    """The ops take the formula's arguments and then backend, by position or by name, as the losses call them."""
    s, t = _features((2, 3, 4, 5))
    assert torch.equal(ops.spatial_kl(s, t, 2.0, 'torch'), reference.spatial_kl(s, t, 2.0))
    assert torch.equal(ops.spatial_attention(s, 1.5, backend='torch'), reference.spatial_attention(s, 1.5))
    dist, att = ops.spatial_kl_and_attention(s, t, p=3.0, tau=2.0, backend='torch')
    assert (dist, att) == reference.spatial_kl_and_attention(s, t, 2.0, 3.0)
