"""The Triton SA ops against the PyTorch reference (values and gradients), the reference against finite
differences, what the fused op saves for backward, and the dispatcher's errors.

On a CPU machine the Triton kernels run in the interpreter (TRITON_INTERPRET=1, see conftest.py); with a GPU
and TRITON_INTERPRET=0 the same tests run them compiled on CUDA tensors.
"""
import pytest
import torch

from timm_sadistill import UsageError, ops
from timm_sadistill.ops import reference

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


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('layout', LAYOUTS)
def test_sa_loss_terms_matches_reference(shape, dtype, layout):
    s, t = _features(shape, dtype, layout)
    s_tri, s_ref = _leaf(s), _leaf(s, torch.float32)
    dist, att = ops.spatial_kl_and_attention(s_tri, t, tau=4.0, p=2.0, backend='triton')
    dist_ref, att_ref = reference.spatial_kl_and_attention(s_ref, t.float(), tau=4.0, p=2.0)
    torch.testing.assert_close(dist, dist_ref, rtol=LOSS_RTOL, atol=1e-6)
    torch.testing.assert_close(att, att_ref, rtol=LOSS_RTOL, atol=1e-6)

    (0.7 * dist + 1.3 * att).backward()
    (0.7 * dist_ref + 1.3 * att_ref).backward()
    assert s_tri.grad.dtype == dtype
    assert s_tri.grad.stride() == s.stride()
    _assert_grad_close(s_tri.grad, s_ref.grad, dtype)


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


@pytest.mark.parametrize('shape', SHAPES + [(1, 2, 112, 112)])
@pytest.mark.parametrize('dtype', DTYPES)
def test_spatial_attention_matches_reference(shape, dtype):
    x, _ = _features(shape, dtype)
    x_tri, x_ref = _leaf(x), _leaf(x, torch.float32)
    a = ops.spatial_attention(x_tri, p=2.0, backend='triton')
    a_ref = reference.spatial_attention(x_ref, p=2.0)
    assert a.shape == (shape[0], shape[2] * shape[3]) and a.dtype == torch.float32
    torch.testing.assert_close(a, a_ref, rtol=LOSS_RTOL, atol=1e-6)
    grad = torch.randn(a.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    a.backward(grad)
    a_ref.backward(grad)
    _assert_grad_close(x_tri.grad, x_ref.grad, dtype)


@pytest.mark.parametrize('shape', SHAPES + [(1, 2, 112, 112)])
@pytest.mark.parametrize('dtype', DTYPES)
def test_spatial_kl_matches_reference(shape, dtype):
    s, t = _features(shape, dtype, 'channels_last' if dtype == torch.bfloat16 else 'contiguous')
    s_tri, s_ref = _leaf(s), _leaf(s, torch.float32)
    kl = ops.spatial_kl(s_tri, t, tau=2.0, backend='triton')
    kl_ref = reference.spatial_kl(s_ref, t.float(), tau=2.0)
    torch.testing.assert_close(kl, kl_ref, rtol=LOSS_RTOL, atol=1e-6)
    (3.0 * kl).backward()
    (3.0 * kl_ref).backward()
    _assert_grad_close(s_tri.grad, s_ref.grad, dtype)


def test_teacher_takes_no_gradient():
    s, t = _features((2, 4, 3, 5))
    s, t = _leaf(s), _leaf(t)
    dist, att = ops.spatial_kl_and_attention(s, t, backend='triton')
    (dist + att + ops.spatial_kl(s, t, backend='triton')).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_forward_is_deterministic():
    s, t = _features((2, 70, 5, 5))
    first = ops.spatial_kl_and_attention(s, t, backend='triton')
    second = ops.spatial_kl_and_attention(s, t, backend='triton')
    assert all(torch.equal(a, b) for a, b in zip(first, second))


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


def test_auto_on_cpu_runs_the_reference(monkeypatch):
    from timm_sadistill.ops import spatial_triton

    def fail(*args, **kwargs):
        raise AssertionError('backend=auto ran the Triton kernel on CPU tensors')

    for name in ('forward', 'backward'):  # the kernel layer's entries: every launch goes through them
        monkeypatch.setattr(spatial_triton, name, fail)
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 4, 5, generator=g)
    assert torch.equal(ops.spatial_attention(s), reference.spatial_attention(s))
    assert torch.equal(ops.spatial_kl(s, t), reference.spatial_kl(s, t))
    assert all(torch.equal(a, b) for a, b in zip(ops.spatial_kl_and_attention(s, t), reference.spatial_kl_and_attention(s, t)))


@pytest.mark.skipif(DEVICE.type != 'cuda', reason='auto picks Triton only for CUDA tensors')
def test_auto_on_cuda_runs_triton():
    s, t = _features((2, 5, 7, 9), torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(ops.spatial_kl_and_attention(s, t), ops.spatial_kl_and_attention(s, t, backend='triton')))
    # float64 has no kernel: auto falls back to the reference
    s64, t64 = s.double(), t.double()
    assert all(torch.equal(a, b) for a, b in zip(ops.spatial_kl_and_attention(s64, t64), reference.spatial_kl_and_attention(s64, t64)))


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
    monkeypatch.setenv('TRITON_INTERPRET', '0')
    with pytest.raises(RuntimeError, match='got a tensor on cpu; move it to CUDA'):
        ops.spatial_attention(s.cpu(), backend='triton')
