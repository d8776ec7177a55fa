"""The dispatch's first-use check of backend='auto' (a kernel that raises or returns wrong numbers warns once and is
replaced by the PyTorch path for its key, with no retry) and backend='triton' staying strict, shown on the spatial
ops' kernel entries; and a Triton file that does not import leaving its ops to the PyTorch formulas.

auto picks the Triton kernels only for CUDA tensors; here its device test is patched so that it picks them for CPU
tensors, which the kernels take under the interpreter (TRITON_INTERPRET=1, conftest.py).
"""
import warnings

import pytest
import torch

from timm_sadistill import ops
from timm_sadistill.ops import _first_use, dispatch, op_registry, reference, spatial_triton

SHAPE = (2, 5, 4, 3)


@pytest.fixture
def auto_picks_triton(monkeypatch):
    monkeypatch.setattr(dispatch, '_is_cuda', lambda x: True)
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


def test_a_triton_file_that_does_not_import_leaves_its_ops_to_the_formulas(auto_picks_triton, monkeypatch):
    monkeypatch.setattr(op_registry, '_FUSED_OPS', dict(op_registry._FUSED_OPS))

    def old_triton(module):
        raise AttributeError("module 'triton.language' has no attribute 'exp2'")

    monkeypatch.setattr(op_registry.importlib, 'import_module', old_triton)
    with pytest.warns(RuntimeWarning, match=r"spatial_triton did not import \(AttributeError: .*exp2"):
        failed = op_registry.load_triton_files()
    assert list(failed) == ['timm_sadistill.ops.spatial_triton']
    assert not [op for op in op_registry.fused_ops().values() if op.module == 'timm_sadistill.ops.spatial_triton']

    # what the dispatcher does with such an op: auto runs the formula, triton says why it cannot
    monkeypatch.setattr(dispatch, '_TRITON_PATHS', {})
    monkeypatch.setattr(dispatch, '_TRITON_FAILED', failed)
    s, t = _features()
    assert torch.equal(ops.spatial_kl(s, t), reference.spatial_kl(s, t))
    with pytest.raises(RuntimeError, match="spatial_kl has no Triton kernel here .*exp2.*; use backend='torch'"):
        ops.spatial_kl(s, t, backend='triton')
