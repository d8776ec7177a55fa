"""The ops' custom-op layer and dispatch: the first-use check of backend='auto' (a kernel that raises or returns wrong
numbers warns once and is replaced by the PyTorch path for its key, with no retry), backend='triton' staying strict,
and the fake implementations torch.compile traces with.

auto picks the Triton kernels only for CUDA tensors; here its device test is patched so that it picks them for CPU
tensors, which the kernels take under the interpreter (TRITON_INTERPRET=1, conftest.py).
"""
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from timm_sadistill import ops
from timm_sadistill.ops import _first_use, reference, spatial_triton

SHAPE = (2, 5, 4, 3)


@pytest.fixture
def auto_picks_triton(monkeypatch):
    monkeypatch.setattr(ops, '_is_cuda', lambda x: True)
    _first_use.forget()
    yield
    _first_use.forget()


def _features(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(SHAPE, generator=g)
    t = 0.5 * s + torch.randn(SHAPE, generator=g)
    return s.to(dtype).requires_grad_(), t.to(dtype)


def _counting(monkeypatch, name, wrap):
    """Replace spatial_triton.<name> (a kernel entry) by wrap(original, *args); returns the list of its calls."""
    original = getattr(spatial_triton, name)
    calls = []

    def entry(*args, **kwargs):
        calls.append(args)
        return wrap(original, *args, **kwargs)

    monkeypatch.setattr(spatial_triton, name, entry)
    return calls


def _first_use_warnings(record):
    return [w for w in record if 'first-use check' in str(w.message)]


def _loss_and_grad(fn, s, t):
    s = s.detach().requires_grad_()
    dist, att = fn(s, t)
    (dist + att).backward()
    return dist.detach(), att.detach(), s.grad


def _reference_loss_and_grad(s, t):
    return _loss_and_grad(lambda a, b: reference.spatial_kl_and_attention(a, b), s.float(), t.float())


def test_auto_checks_a_kernel_once_and_then_trusts_it(auto_picks_triton, monkeypatch):
    s, t = _features()
    calls = _counting(monkeypatch, 'forward', lambda f, *a, **k: f(*a, **k))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        first = _loss_and_grad(ops.spatial_kl_and_attention, s, t)
        assert len(calls) == 2  # the first sample (checked against PyTorch), then the batch
        second = _loss_and_grad(ops.spatial_kl_and_attention, s, t)
    assert len(calls) == 3  # trusted: no check the second time
    for got, expected in zip(first, _reference_loss_and_grad(s, t)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_auto_falls_back_once_when_the_kernel_raises(auto_picks_triton, monkeypatch):
    s, t = _features(torch.bfloat16)

    def broken(original, *args, **kwargs):
        raise RuntimeError('PTX JIT compilation failed')

    calls = _counting(monkeypatch, 'forward', broken)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter('always')
        first = _loss_and_grad(ops.spatial_kl_and_attention, s, t)
        second = _loss_and_grad(ops.spatial_kl_and_attention, s, t)
    (warning,) = _first_use_warnings(record)
    message = str(warning.message)
    assert 'spatial_kl_and_attention' in message and 'PTX JIT compilation failed' in message
    assert 'cpu (bfloat16 (2, 5, 4, 3) contiguous' in message  # the device and the shapes
    assert len(calls) == 1  # no retry: the PyTorch path serves the key from then on
    expected = _loss_and_grad(reference.spatial_kl_and_attention, s, t)
    for got, want in zip(first, expected):
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-3)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_auto_falls_back_once_when_the_kernel_is_wrong(auto_picks_triton, monkeypatch):
    s, t = _features()

    def wrong(original, *args, **kwargs):
        stats = original(*args, **kwargs)
        return stats._replace(kl=stats.kl * 1.01)

    calls = _counting(monkeypatch, 'forward', wrong)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter('always')
        dist = ops.spatial_kl(s, t)
        ops.spatial_kl(s, t)
    (warning,) = _first_use_warnings(record)
    assert 'spatial_kl' in str(warning.message) and 'differs' in str(warning.message)
    assert len(calls) == 1
    torch.testing.assert_close(dist, reference.spatial_kl(s, t), rtol=1e-5, atol=1e-7)


def test_auto_falls_back_when_the_backward_kernel_is_wrong(auto_picks_triton, monkeypatch):
    s, t = _features()
    calls = _counting(monkeypatch, 'backward', lambda f, *a, **k: -f(*a, **k))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter('always')
        first = _loss_and_grad(ops.spatial_kl_and_attention, s, t)
        _loss_and_grad(ops.spatial_kl_and_attention, s, t)
    assert len(_first_use_warnings(record)) == 1 and len(calls) == 1
    torch.testing.assert_close(first[2], _reference_loss_and_grad(s, t)[2], rtol=1e-4, atol=1e-7)


def test_triton_backend_stays_strict(auto_picks_triton, monkeypatch):
    s, t = _features()

    def broken(original, *args, **kwargs):
        raise RuntimeError('PTX JIT compilation failed')

    _counting(monkeypatch, 'forward', broken)
    with pytest.raises(RuntimeError, match='PTX JIT compilation failed'):
        ops.spatial_attention(s, backend='triton')


def test_fake_implementations_give_the_output_shapes():
    from timm_sadistill.ops import spatial_custom_ops as custom
    with FakeTensorMode():
        s = torch.empty(4, 6, 5, 3, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        t = torch.empty_like(s)
        maps, norms = custom._attention_fwd(s, 2.0, True)
        kl, lse_s, lse_t = custom._kl_fwd(s, t, 4.0, True)
        dist, att, lse_s2, lse_t2, w = custom._kl_and_attention_fwd(s, t, 4.0, 2.0, True)
        ds = custom._ds(s, t, lse_s, lse_t, dist, w, 4.0, 2.0, True)
    assert (maps.shape, norms.shape, w.shape) == ((4, 15), (4,), (4, 15))
    assert kl.shape == dist.shape == att.shape == ()
    assert lse_s.shape == lse_t.shape == lse_s2.shape == lse_t2.shape == (4, 6)
    assert all(x.dtype == torch.float32 for x in (maps, norms, kl, lse_s, lse_t, dist, att, w))
    assert ds.shape == s.shape and ds.dtype == torch.bfloat16 and ds.stride() == s.stride()


# numpy, under the interpreter, warns on log2(0) of zero padding; the kernel masks those lanes
@pytest.mark.filterwarnings('ignore:divide by zero:RuntimeWarning')
@pytest.mark.parametrize('layout', ['contiguous', 'channels_last'])
def test_custom_ops_pass_opcheck(layout):
    """Schema, fake implementation and autograd registration of each op against its real (interpreted) run."""
    from timm_sadistill.ops import spatial_custom_ops as custom
    s, t = (x.detach() for x in _features())
    if layout == 'channels_last':
        s, t = s.to(memory_format=torch.channels_last), t.to(memory_format=torch.channels_last)
    s.requires_grad_()
    tests = ('test_schema', 'test_faketensor', 'test_autograd_registration')
    torch.library.opcheck(custom._attention_fwd, (s, 1.5, True), test_utils=tests)
    torch.library.opcheck(custom._kl_fwd, (s, t, 2.0, True), test_utils=tests)
    torch.library.opcheck(custom._kl_and_attention_fwd, (s, t, 2.0, 2.0, True), test_utils=tests)
