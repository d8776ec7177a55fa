"""The spatial ops' own claims (`timm_sadistill/ops/spatial_triton.py`), beyond what tests/ops/test_ops.py checks of every
registered op: one term's gradient alone, general p, a large map, mixed and copied layouts, mixed dtypes, what the
fused op saves for backward, the reference against finite differences, and the custom ops' registration (schema,
fake implementations, autograd) that torch.compile relies on.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from timm_sadistill import ops
from timm_sadistill.ops import reference, spatial_triton

from test_ops import DTYPES, LOSS_RTOL, _assert_grad_close, _features, _leaf  # noqa: E402 (tests/ is on sys.path)


@pytest.mark.parametrize('term', [0, 1])
def test_sa_loss_terms_single_term_gradient(term):
    """Backward of one term alone skips the other half of the kernel; the gradient must still be that term's."""
    s, t = _features((3, 5, 7, 9))
    s_tri, s_ref = _leaf(s), _leaf(s)
    ops.spatial_kl_and_attention(s_tri, t, backend='triton')[term].backward()
    reference.spatial_kl_and_attention(s_ref, t)[term].backward()
    _assert_grad_close(s_tri.grad, s_ref.grad, torch.float32)


def _check_sa_terms(s_tri, s_ref, t, grad_dtype=torch.float32, **options):
    """Triton vs reference `spatial_kl_and_attention` on the leaves s_tri / s_ref: both values, then the gradient of their sum."""
    dist, att = ops.spatial_kl_and_attention(s_tri, t, backend='triton', **options)
    dist_ref, att_ref = reference.spatial_kl_and_attention(s_ref, t, **options)
    torch.testing.assert_close(dist, dist_ref, rtol=LOSS_RTOL, atol=1e-6)
    torch.testing.assert_close(att, att_ref, rtol=LOSS_RTOL, atol=1e-6)
    (dist + att).backward()
    (dist_ref + att_ref).backward()
    _assert_grad_close(s_tri.grad, s_ref.grad, grad_dtype)


# numpy, under the interpreter, warns on log2(0) of zero padding; the kernel masks those lanes
@pytest.mark.filterwarnings('ignore:divide by zero:RuntimeWarning', 'ignore:invalid value:RuntimeWarning')
@pytest.mark.parametrize('p', [1.0, 1.5, 3.0])
def test_sa_loss_terms_general_p(p):
    s, t = _features((2, 6, 5, 7))
    _check_sa_terms(_leaf(s), _leaf(s), t, tau=2.0, p=p)


def test_sa_loss_terms_large_map():
    """112 x 112 = 12544 positions: several position blocks through the online softmax and the finisher."""
    s, t = _features((1, 2, 112, 112))
    _check_sa_terms(_leaf(s), _leaf(s), t)


def test_sa_loss_terms_mixed_and_copied_layouts():
    """s channels-last, t NCHW; and a transposed map, whose positions are not one stride apart (copied)."""
    s, t = _features((2, 6, 5, 7))
    for s_in, t_in in [(s.to(memory_format=torch.channels_last), t), (s.transpose(2, 3), t.transpose(2, 3))]:
        _check_sa_terms(_leaf(s_in), _leaf(s_in), t_in)


def test_sa_loss_terms_mixed_dtypes():
    """A bfloat16 student (autocast) against a float32 teacher: each input is read in its own dtype."""
    s, t = _features((2, 6, 5, 7))
    _check_sa_terms(_leaf(s, torch.bfloat16), _leaf(s.bfloat16(), torch.float32), t, grad_dtype=torch.bfloat16)


@pytest.mark.parametrize('dtype', DTYPES)
def test_spatial_attention_large_map(dtype):
    shape = (1, 2, 112, 112)
    x, _ = _features(shape, dtype)
    x_tri, x_ref = _leaf(x), _leaf(x, torch.float32)
    a = ops.spatial_attention(x_tri, p=2.0, backend='triton')
    a_ref = reference.spatial_attention(x_ref, p=2.0)
    assert a.shape == (shape[0], shape[2] * shape[3]) and a.dtype == torch.float32
    torch.testing.assert_close(a, a_ref, rtol=LOSS_RTOL, atol=1e-6)
    grad = torch.randn(a.shape, generator=torch.Generator().manual_seed(1)).to(a.device)
    a.backward(grad)
    a_ref.backward(grad)
    _assert_grad_close(x_tri.grad, x_ref.grad, dtype)


@pytest.mark.parametrize('dtype', DTYPES)
def test_spatial_kl_large_map_other_tau(dtype):
    s, t = _features((1, 2, 112, 112), dtype, 'channels_last' if dtype == torch.bfloat16 else 'contiguous')
    s_tri, s_ref = _leaf(s), _leaf(s, torch.float32)
    kl = ops.spatial_kl(s_tri, t, tau=2.0, backend='triton')
    kl_ref = reference.spatial_kl(s_ref, t.float(), tau=2.0)
    torch.testing.assert_close(kl, kl_ref, rtol=LOSS_RTOL, atol=1e-6)
    (3.0 * kl).backward()
    (3.0 * kl_ref).backward()
    _assert_grad_close(s_tri.grad, s_ref.grad, dtype)


def _saved_by(fn, s, t):
    saved = []

    def pack(x):
        saved.append(x)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn(s, t)
    return saved


def test_sa_loss_terms_saves_only_inputs_and_small_stats():
    b, c, h, w = 2, 8, 6, 5
    s, t = _features((b, c, h, w))
    s = _leaf(s)
    inputs = {s.data_ptr(), t.data_ptr()}

    def is_large_temporary(x):
        return x.data_ptr() not in inputs and x.numel() >= b * c * h * w

    saved = _saved_by(lambda s, t: ops.spatial_kl_and_attention(s, t, backend='triton'), s, t)
    assert {x.data_ptr() for x in saved} >= inputs
    assert not [tuple(x.shape) for x in saved if is_large_temporary(x)]
    # the check can fail: the reference keeps B x C x N softmaxes for its backward
    assert any(is_large_temporary(x) for x in _saved_by(reference.spatial_kl_and_attention, s, t))


def test_reference_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: reference.spatial_attention(x, 2.0), (s,))
    assert torch.autograd.gradcheck(lambda x: reference.spatial_attention(x, 1.5), (s,))
    assert torch.autograd.gradcheck(lambda a, b: reference.spatial_kl(a, b, 2.0), (s, t))
    assert torch.autograd.gradcheck(lambda a, b: reference.spatial_kl_and_attention(a, b, 2.0, 2.0), (s, t))


def _custom_op_features():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 4, 3, generator=g)
    return s, 0.5 * s + torch.randn(2, 5, 4, 3, generator=g)


def test_fake_implementations_give_the_output_shapes():
    with FakeTensorMode():
        s = torch.empty(4, 6, 5, 3, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        t = torch.empty_like(s)
        maps, norms = spatial_triton._attention_fwd(s, 2.0, True)
        kl, lse_s, lse_t = spatial_triton._kl_fwd(s, t, 4.0, True)
        dist, att, lse_s2, lse_t2, w = spatial_triton._kl_and_attention_fwd(s, t, 4.0, 2.0, True)
        ds = spatial_triton._ds(s, t, lse_s, lse_t, dist, w, 4.0, 2.0, True)
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
    s, t = _custom_op_features()
    if layout == 'channels_last':
        s, t = s.to(memory_format=torch.channels_last), t.to(memory_format=torch.channels_last)
    s.requires_grad_()
    tests = ('test_schema', 'test_faketensor', 'test_autograd_registration')
    torch.library.opcheck(spatial_triton._attention_fwd, (s, 1.5, True), test_utils=tests)
    torch.library.opcheck(spatial_triton._kl_fwd, (s, t, 2.0, True), test_utils=tests)
    torch.library.opcheck(spatial_triton._kl_and_attention_fwd, (s, t, 2.0, 2.0, True), test_utils=tests)
