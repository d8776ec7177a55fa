"""The fused SA ops as ``torch.library`` custom ops over the Triton kernels (`spatial_triton`).

Custom ops are opaque to ``torch.compile``: dynamo records one call per op instead of tracing into the kernel
launches (which it cannot), the fake implementations give the output shapes and dtypes, and ``register_autograd``
makes them differentiable. Four ops in the ``timm_sadistill`` namespace, every output float32 except ds:

    spatial_attention_fwd(x, p, strict) -> (maps (B, N), norms (B,))             norms: ||A_b||, A = mean_c |x|^p
    spatial_kl_fwd(s, t, tau, strict) -> (kl (), lse_s (B, C), lse_t (B, C))     lse: log-sum-exp of x/tau per row
    spatial_kl_and_attention_fwd(s, t, tau, p, strict) -> (dist (), att (), lse_s, lse_t, w (B, N))
    spatial_ds(s, t?, lse_s?, lse_t?, g_dist?, w?, tau, p, strict) -> ds, shaped and laid out like s

with w = dL_att/dA^s / C and, for the backward,
    ds = g_dist * tau / (B*C) * (softmax(s/tau) - softmax(t/tau)) + w * d|s|^p/ds   (either term absent when None).

Implementations: on CUDA the Triton kernels; on the CPU the Triton kernels under the interpreter
(TRITON_INTERPRET=1, how CI runs them) and otherwise the same quantities in PyTorch (``_torch_*``, from
`reference`'s formulas). ``strict=False`` (``backend='auto'``) puts the Triton kernels behind the first-use check
(`_first_use`): a variant that fails it is served by the PyTorch formulas for the rest of the process.

The teacher t takes no gradient (a distillation target); x of spatial_attention does.
"""
import os
from typing import Optional, Tuple

import torch

from . import _first_use, reference, spatial_triton

__all__ = ['spatial_attention', 'spatial_kl', 'spatial_kl_and_attention']

_NORM_EPS = spatial_triton.NORM_EPS  # F.normalize's default, as the kernels use it
Tensor = torch.Tensor


def _interpreting() -> bool:
    return os.environ.get('TRITON_INTERPRET') == '1'


def _variant(op: str, *tensors: Optional[Tensor], p: Optional[float] = None) -> tuple:
    """What fixes a launch's compiled kernel: device, dtypes and strides (layout) of the inputs, C and N, p == 2."""
    x = tensors[0]
    return (op, x.device, x.shape[1], x.shape[2:].numel(), p == 2.0,
            *((y.dtype, y.stride()[1:]) if y is not None else None for y in tensors))


def _first(*tensors: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
    """The first sample of each (B, ...) tensor: same C, N and strides, so the same kernel variant."""
    return tuple(None if y is None else y[:1] for y in tensors)


# ---------------------------------------------------------------------------------------------------- PyTorch side

def _torch_attention(x: Tensor, p: float) -> Tuple[Tensor, Tensor]:
    maps = reference.spatial_attention(x, p)
    norms = x.float().abs().pow(p).mean(dim=1).flatten(1).norm(dim=1)
    return maps, norms


def _lse(x: Tensor, tau: float) -> Tensor:
    return torch.logsumexp(x.float().flatten(2) / tau, dim=2)


def _torch_kl(s: Tensor, t: Tensor, tau: float) -> Tuple[Tensor, Tensor, Tensor]:
    return reference.spatial_kl(s, t, tau), _lse(s, tau), _lse(t, tau)


def _torch_kl_and_attention(s: Tensor, t: Tensor, tau: float, p: float) -> Tuple[Tensor, ...]:
    dist, att = reference.spatial_kl_and_attention(s, t, tau, p)
    maps_s, norms_s = _torch_attention(s, p)
    d = maps_s - reference.spatial_attention(t, p)
    # dL/da = 2/B d; through a = A / max(||A||, eps): (g - a (a . g)) / ||A||, no projection below eps (the clamp)
    proj = torch.where(norms_s >= _NORM_EPS, (maps_s * d).sum(dim=1), 0.0)
    w = 2.0 / s.shape[0] * (d - maps_s * proj[:, None]) / (norms_s.clamp_min(_NORM_EPS)[:, None] * s.shape[1])
    return dist, att, _lse(s, tau), _lse(t, tau), w


def _torch_ds(s: Tensor, t: Optional[Tensor], lse_s: Optional[Tensor], lse_t: Optional[Tensor],
              g_dist: Optional[Tensor], w: Optional[Tensor], tau: float, p: float) -> Tensor:
    b, c = s.shape[:2]
    x = s.float().flatten(2)
    ds = torch.zeros_like(x)
    if g_dist is not None:
        p_s = torch.exp(x / tau - lse_s[..., None])
        p_t = torch.exp(t.float().flatten(2) / tau - lse_t[..., None])
        ds = ds + g_dist.float() * tau / (b * c) * (p_s - p_t)
    if w is not None:
        # subgradient 0 at 0, where |x|^(p-1) may be inf
        grad_pow = torch.where(x != 0, p * x.abs().pow(p - 1) * x.sign(), 0.0)
        ds = ds + w[:, None, :] * grad_pow
    return torch.empty_like(s).copy_(ds.view(s.shape))


# ----------------------------------------------------------------------------------------------------- Triton side

def _triton_attention(x: Tensor, p: float) -> Tuple[Tensor, Tensor]:
    stats = spatial_triton.forward(x, None, 1.0, p, do_att=True)
    return stats.map_s, stats.norm_s


def _triton_kl(s: Tensor, t: Tensor, tau: float) -> Tuple[Tensor, Tensor, Tensor]:
    stats = spatial_triton.forward(s, t, tau, 2.0, do_att=False)
    return stats.kl.sum(), stats.lse_s, stats.lse_t


def _triton_kl_and_attention(s: Tensor, t: Tensor, tau: float, p: float) -> Tuple[Tensor, ...]:
    stats = spatial_triton.forward(s, t, tau, p, do_att=True)
    return stats.kl.sum(), stats.att.sum(), stats.lse_s, stats.lse_t, stats.map_s


def _triton_ds(s: Tensor, t: Optional[Tensor], lse_s: Optional[Tensor], lse_t: Optional[Tensor],
               g_dist: Optional[Tensor], w: Optional[Tensor], tau: float, p: float) -> Tensor:
    ds = spatial_triton.backward(s, t, lse_s, lse_t, g_dist, w, tau, p)
    # a layout whose positions are not one stride apart was computed contiguous: hand it back in s's layout
    return ds if ds.stride() == s.stride() else torch.empty_like(s).copy_(ds)


# ------------------------------------------------------------------------------------------------------ custom ops

def _implement(op_name: str, triton_fn, torch_fn, key_fn, sample_fn, on_cpu: bool):
    """The device implementation: Triton (behind the first-use check unless strict); on the CPU only under the
    interpreter, else the PyTorch formulas."""
    def run(*args):
        *args, strict = args
        if on_cpu and not _interpreting():
            return torch_fn(*args)
        return _first_use.checked_call(op_name, key_fn(*args), strict, triton_fn, torch_fn, tuple(args), sample_fn)
    return run


@torch.library.custom_op('timm_sadistill::spatial_attention_fwd', mutates_args=(), device_types='cuda')
def _attention_fwd(x: Tensor, p: float, strict: bool) -> Tuple[Tensor, Tensor]:
    return _attention_fwd_impl(x, p, strict)


@torch.library.custom_op('timm_sadistill::spatial_kl_fwd', mutates_args=(), device_types='cuda')
def _kl_fwd(s: Tensor, t: Tensor, tau: float, strict: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return _kl_fwd_impl(s, t, tau, strict)


@torch.library.custom_op('timm_sadistill::spatial_kl_and_attention_fwd', mutates_args=(), device_types='cuda')
def _kl_and_attention_fwd(s: Tensor, t: Tensor, tau: float, p: float,
                          strict: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _kl_and_attention_fwd_impl(s, t, tau, p, strict)


@torch.library.custom_op('timm_sadistill::spatial_ds', mutates_args=(), device_types='cuda')
def _ds(s: Tensor, t: Optional[Tensor], lse_s: Optional[Tensor], lse_t: Optional[Tensor], g_dist: Optional[Tensor],
        w: Optional[Tensor], tau: float, p: float, strict: bool) -> Tensor:
    return _ds_impl(s, t, lse_s, lse_t, g_dist, w, tau, p, strict)


_IMPLS = {
    # op: (custom op, Triton, PyTorch, key, first sample)
    'spatial_attention': (_attention_fwd, _triton_attention, _torch_attention,
                          lambda x, p: _variant('spatial_attention', x, p=p),
                          lambda a: (*_first(a[0]), *a[1:])),
    'spatial_kl': (_kl_fwd, _triton_kl, _torch_kl,
                   lambda s, t, tau: _variant('spatial_kl', s, t),
                   lambda a: (*_first(a[0], a[1]), *a[2:])),
    'spatial_kl_and_attention': (_kl_and_attention_fwd, _triton_kl_and_attention, _torch_kl_and_attention,
                                 lambda s, t, tau, p: _variant('spatial_kl_and_attention', s, t, p=p),
                                 lambda a: (*_first(a[0], a[1]), *a[2:])),
    'spatial_ds': (_ds, _triton_ds, _torch_ds,
                   lambda s, t, lse_s, lse_t, g, w, tau, p: _variant('spatial_ds', s, t, lse_s, g, w, p=p),
                   lambda a: (*_first(*a[:4]), a[4], *_first(a[5]), *a[6:])),
}
_attention_fwd_impl, _kl_fwd_impl, _kl_and_attention_fwd_impl, _ds_impl = (
    _implement(name, *impl[1:], on_cpu=False) for name, impl in _IMPLS.items())


def _register_cpu_kernels() -> None:
    for name, (op, *impl) in _IMPLS.items():
        op.register_kernel('cpu')(_implement(name, *impl, on_cpu=True))


_register_cpu_kernels()


@_attention_fwd.register_fake
def _(x, p, strict):
    b, n = x.shape[0], x.shape[2:].numel()
    return x.new_empty(b, n, dtype=torch.float32), x.new_empty(b, dtype=torch.float32)


@_kl_fwd.register_fake
def _(s, t, tau, strict):
    b, c = s.shape[:2]
    return s.new_empty((), dtype=torch.float32), s.new_empty(b, c, dtype=torch.float32), \
        s.new_empty(b, c, dtype=torch.float32)


@_kl_and_attention_fwd.register_fake
def _(s, t, tau, p, strict):
    b, c, n = s.shape[0], s.shape[1], s.shape[2:].numel()
    f32 = dict(dtype=torch.float32)
    return (s.new_empty((), **f32), s.new_empty((), **f32), s.new_empty(b, c, **f32), s.new_empty(b, c, **f32),
            s.new_empty(b, n, **f32))


@_ds.register_fake
def _(s, t, lse_s, lse_t, g_dist, w, tau, p, strict):
    return torch.empty_like(s)


# -------------------------------------------------------------------------------------------------------- autograd

def _setup_attention(ctx, inputs, output):
    x, p, strict = inputs
    maps, norms = output
    ctx.save_for_backward(x, maps, norms)
    ctx.p, ctx.strict = p, strict


def _backward_attention(ctx, grad, _grad_norms):
    x, a, norm = ctx.saved_tensors
    # (B, N) work: dL/dA = (g - a (a . g)) / max(||A||, eps), no projection below eps (F.normalize's clamp)
    g = grad.float()
    proj = torch.where(norm >= _NORM_EPS, (a * g).sum(dim=1), 0.0)
    w = (g - a * proj[:, None]) / (norm.clamp_min(_NORM_EPS)[:, None] * x.shape[1])
    return _ds(x, None, None, None, None, w, 1.0, ctx.p, ctx.strict), None, None


def _setup_kl(ctx, inputs, output):
    s, t, tau, strict = inputs
    _, lse_s, lse_t = output
    ctx.save_for_backward(s, t, lse_s, lse_t)
    ctx.tau, ctx.strict = tau, strict


def _backward_kl(ctx, grad, _grad_lse_s, _grad_lse_t):
    s, t, lse_s, lse_t = ctx.saved_tensors
    return _ds(s, t, lse_s, lse_t, grad, None, ctx.tau, 2.0, ctx.strict), None, None, None


def _setup_kl_and_attention(ctx, inputs, output):
    s, t, tau, p, strict = inputs
    _, _, lse_s, lse_t, w = output
    ctx.save_for_backward(s, t, lse_s, lse_t, w)
    ctx.tau, ctx.p, ctx.strict = tau, p, strict
    # an unused term arrives as None in backward and its half of the kernel is skipped
    ctx.set_materialize_grads(False)


def _backward_kl_and_attention(ctx, g_dist, g_att, *_grad_stats):
    s, t, lse_s, lse_t, w = ctx.saved_tensors
    if g_dist is None and g_att is None:
        return None, None, None, None, None
    w = None if g_att is None else w * g_att
    kl = g_dist is not None
    ds = _ds(s, t if kl else None, lse_s if kl else None, lse_t if kl else None, g_dist, w, ctx.tau, ctx.p, ctx.strict)
    return ds, None, None, None, None


_attention_fwd.register_autograd(_backward_attention, setup_context=_setup_attention)
_kl_fwd.register_autograd(_backward_kl, setup_context=_setup_kl)
_kl_and_attention_fwd.register_autograd(_backward_kl_and_attention, setup_context=_setup_kl_and_attention)


# ---------------------------------------------------------------------------------------------------- entry points

def spatial_attention(x: Tensor, p: float = 2.0, strict: bool = True) -> Tensor:
    """(B, C, H, W) -> (B, H*W) float32 maps: mean_c |x|^p, L2-normalised over the positions."""
    return _attention_fwd(x, float(p), strict)[0]


def spatial_kl(s: Tensor, t: Tensor, tau: float = 4.0, strict: bool = True) -> Tensor:
    """Scalar tau^2/(B*C) * sum_{b,c} KL(softmax_i(t_bc/tau) || softmax_i(s_bc/tau)); t takes no gradient."""
    return _kl_fwd(s, t.detach(), float(tau), strict)[0]


def spatial_kl_and_attention(s: Tensor, t: Tensor, tau: float = 4.0, p: float = 2.0,
                             strict: bool = True) -> Tuple[Tensor, Tensor]:
    """(L_dist, L_att), two float32 scalars, from one read of s and t (forward) and one of s, t plus a write of
    ds (backward); t takes no gradient."""
    dist, att, *_ = _kl_and_attention_fwd(s, t.detach(), float(tau), float(p), strict)
    return dist, att
