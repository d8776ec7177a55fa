"""The spatial ops' Triton path, in one file: the fused kernels, their launchers `forward` and `backward`, the
``torch.library`` custom ops over them with their autograd, and the entries registered for `spatial_attention`,
`spatial_kl` and `spatial_kl_and_attention` (`op_registry`).

Shapes: s (student), t (teacher) and x are (B, C, H, W) float32 / float16 / bfloat16 tensors; N = H*W. The
public, validated entry is `timm_sadistill.ops` (device, dtype and shape checks live there). All arithmetic is
float32; gradients come back in the input dtype and layout.

Forward, one read of s and t: `_sa_fwd_kernel`, grid (B, ceil(C / BLOCK_C)). A program owns BLOCK_C channel
rows of one sample and walks the N positions in BLOCK_N tiles, so
  * each row's online softmax statistics (max, sum-exp) of s/tau and t/tau and its KL numerator stay in
    registers until the row is done, and
  * the column sums of |x|^p over the program's BLOCK_C channels go to a (B, ceil(C / BLOCK_C), N) float32
    partial buffer that `_attention_finish_kernel` (grid (B,)) sums in a fixed order. That keeps the result
    deterministic, unlike atomics, at the cost of writing and reading back 4 bytes per BLOCK_C input
    elements: 4 / (BLOCK_C * itemsize) of the input bytes (3 % for bfloat16 channels-last, 6 % for NCHW).
The finishing kernel turns the channel means into the normalised maps, L_att and dL_att/dA^s, all (B, N).

Backward: `_sa_bwd_kernel`, grid (B, ceil(C / BLOCK_C), ceil(N / BLOCK_N)); every tile is independent. It
recomputes softmax(s/tau) and softmax(t/tau) from the saved per-row log-sum-exps and writes ds once:
    ds = g_dist * tau / (B*C) * (P^s - P^t) + dL/dA^s_{b,i} * p/C * |s|^(p-1) * sign(s),
where A^s_b(i) = mean_c |s_{b,c,i}|^p is the map before normalisation. Saved for backward: the inputs, the
(B, C) log-sum-exps and (B, N) / (B,) per-sample tensors; never a B x C x N temporary.

Strides are passed to the kernels, so NCHW and channels-last inputs (a ViT's (B, N, C) tokens viewed as
(B, C, H, W) are channels-last) are read in place; only a layout in which the H*W positions are not one stride
apart is copied to contiguous first. The launch configuration is a fixed heuristic (`launch_config`), not
autotuned: autotuning does not run under the interpreter, and the partial buffer's shape depends on BLOCK_C.

The custom ops are opaque to ``torch.compile``: dynamo records one call per op instead of tracing into the kernel
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
import contextlib
import os
from typing import ContextManager, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _first_use, reference
from .op_registry import register_fused_op

__all__ = ['LaunchConfig', 'NORM_EPS', 'backward', 'forward', 'launch_config', 'spatial_attention', 'spatial_kl',
           'spatial_kl_and_attention']

# F.normalize's default: the smallest norm an attention map is divided by
NORM_EPS = 1e-12
# elements per (BLOCK_C, BLOCK_N) tile: 8 values a thread and input at 4 warps. At 16 (a 2048-element tile) the
# paired forward takes 255 registers a thread on sm_80 and sm_90 when the rows are not 16-aligned (NCHW with H*W
# not a multiple of 16: ResNet-50 stages 3 and 4, ViT grids), which leaves 2 blocks (8 warps) an SM; at 8 every
# launch stays within 128 registers without spills (`compile_report`, docs/kernels.md)
_TILE = 1024
_NUM_WARPS = 4
_NUM_STAGES = 3  # Triton's default; the loops stream, and the register counts do not change with it


@triton.jit
def _abs_pow(x, p, P_IS_TWO: tl.constexpr):
    # p == 2, the default, is exact and skips the exp2/log2 pair
    if P_IS_TWO:
        y = x * x
    else:
        y = tl.exp2(p * tl.log2(tl.abs(x)))
    return y


@triton.jit
def _abs_pow_grad(x, p, P_IS_TWO: tl.constexpr):
    if P_IS_TWO:
        y = 2.0 * x
    else:
        # subgradient 0 at x == 0, where sign(x) is 0 and |x|^(p-1) may be inf or nan
        mag = p * tl.exp2((p - 1.0) * tl.log2(tl.abs(x)))
        y = tl.where(x > 0.0, mag, tl.where(x < 0.0, -mag, 0.0))
    return y


@triton.jit
def _sa_fwd_kernel(
        S, T, LSE_S, LSE_T, KL_PART, PART_S, PART_T,
        C, N,
        s_sb, s_sc, s_sn, t_sb, t_sc, t_sn,
        inv_tau, p, kl_scale,
        PAIR: tl.constexpr, DO_ATT: tl.constexpr, P_IS_TWO: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One (sample, channel block): softmax stats + KL of the rows (PAIR) and |x|^p column sums (DO_ATT).

    PAIR: s and t given; writes LSE_S, LSE_T (B, C) and KL_PART (B, n_cblk) = kl_scale * sum of the block's row KLs.
    DO_ATT: writes PART_S (and PART_T when PAIR), (B, n_cblk, N): sum over the block's channels of |x|^p.
    """
    b = tl.program_id(0).to(tl.int64)
    cb = tl.program_id(1)
    n_cblk = tl.num_programs(1)
    rows = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < C
    rows64 = rows[:, None].to(tl.int64)
    part_off = (b * n_cblk + cb) * N

    m_s = tl.full([BLOCK_C], float('-inf'), tl.float32)
    m_t = tl.full([BLOCK_C], float('-inf'), tl.float32)
    z_s = tl.zeros([BLOCK_C], tl.float32)
    z_t = tl.zeros([BLOCK_C], tl.float32)
    # sum_i exp(t_i/tau - m_t) * (t_i - s_i)/tau, rescaled with m_t like z_t
    u = tl.zeros([BLOCK_C], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        mask = row_ok[:, None] & col_ok[None, :]
        s = tl.load(S + b * s_sb + rows64 * s_sc + cols[None, :] * s_sn, mask=mask, other=0.0).to(tl.float32)
        if DO_ATT:
            tl.store(PART_S + part_off + cols, tl.sum(_abs_pow(s, p, P_IS_TWO), axis=0), mask=col_ok)
        if PAIR:
            t = tl.load(T + b * t_sb + rows64 * t_sc + cols[None, :] * t_sn, mask=mask, other=0.0).to(tl.float32)
            if DO_ATT:
                tl.store(PART_T + part_off + cols, tl.sum(_abs_pow(t, p, P_IS_TWO), axis=0), mask=col_ok)
            # padded positions take no softmax mass; padded rows stay finite (logits 0) and are never stored
            ls = tl.where(col_ok[None, :], s * inv_tau, float('-inf'))
            lt = tl.where(col_ok[None, :], t * inv_tau, float('-inf'))
            m_s_new = tl.maximum(m_s, tl.max(ls, axis=1))
            z_s = z_s * tl.exp(m_s - m_s_new) + tl.sum(tl.exp(ls - m_s_new[:, None]), axis=1)
            m_s = m_s_new
            m_t_new = tl.maximum(m_t, tl.max(lt, axis=1))
            e_t = tl.exp(lt - m_t_new[:, None])
            rescale_t = tl.exp(m_t - m_t_new)
            z_t = z_t * rescale_t + tl.sum(e_t, axis=1)
            # (t - s) from the zero-padded loads: the -inf logits would make 0 * nan on the padding
            u = u * rescale_t + tl.sum(e_t * ((t - s) * inv_tau), axis=1)
            m_t = m_t_new

    if PAIR:
        lse_s = m_s + tl.log(z_s)
        lse_t = m_t + tl.log(z_t)
        # KL(P^t || P^s) = sum_i P^t_i (t_i - s_i)/tau - lse_t + lse_s
        kl = u / z_t + lse_s - lse_t
        tl.store(LSE_S + b * C + rows, lse_s, mask=row_ok)
        tl.store(LSE_T + b * C + rows, lse_t, mask=row_ok)
        tl.store(KL_PART + b * n_cblk + cb, kl_scale * tl.sum(tl.where(row_ok, kl, 0.0), axis=0))


@triton.jit
def _channel_mean(PART, base, n_cblk, N, cols, col_ok, inv_C, BLOCK_N: tl.constexpr):
    # fixed summation order over the channel blocks, so the maps are bitwise reproducible
    acc = tl.zeros([BLOCK_N], tl.float32)
    for cb in range(n_cblk):
        acc += tl.load(PART + base + cb * N + cols, mask=col_ok, other=0.0)
    return acc * inv_C


@triton.jit
def _attention_finish_kernel(
        PART_S, PART_T, MAP_S, MAP_T, NORM_S, ATT,
        n_cblk, N, inv_C, inv_B, eps,
        PAIR: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Per sample b, from the partial |x|^p sums (B, n_cblk, N).

    PAIR False (spatial_attention): MAP_S <- a^s_b = A^s_b / max(||A^s_b||, eps), NORM_S[b] <- ||A^s_b||.
    PAIR True (spatial_kl_and_attention): ATT[b] <- ||a^s_b - a^t_b||^2 / B and MAP_S <- dL_att/dA^s_b / C (what the
    backward multiplies with d|s|^p/ds); MAP_T is scratch.
    """
    b = tl.program_id(0).to(tl.int64)
    part = b * n_cblk * N
    row = b * N
    sq_s = tl.zeros([BLOCK_N], tl.float32)
    sq_t = tl.zeros([BLOCK_N], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        a_s = _channel_mean(PART_S, part, n_cblk, N, cols, col_ok, inv_C, BLOCK_N)
        tl.store(MAP_S + row + cols, a_s, mask=col_ok)
        sq_s += a_s * a_s
        if PAIR:
            a_t = _channel_mean(PART_T, part, n_cblk, N, cols, col_ok, inv_C, BLOCK_N)
            tl.store(MAP_T + row + cols, a_t, mask=col_ok)
            sq_t += a_t * a_t
    norm_s = tl.sqrt(tl.sum(sq_s, axis=0))
    inv_s = 1.0 / tl.maximum(norm_s, eps)

    if PAIR:
        inv_t = 1.0 / tl.maximum(tl.sqrt(tl.sum(sq_t, axis=0)), eps)
        # the squared distance from the differences, not 2 - 2 cos, which cancels when the maps agree
        sq_d = tl.zeros([BLOCK_N], tl.float32)
        proj = tl.zeros([BLOCK_N], tl.float32)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < N
            a_s = tl.load(MAP_S + row + cols, mask=col_ok, other=0.0) * inv_s
            d = a_s - tl.load(MAP_T + row + cols, mask=col_ok, other=0.0) * inv_t
            sq_d += d * d
            proj += a_s * d
        tl.store(ATT + b, tl.sum(sq_d, axis=0) * inv_B)
        # dL/da^s = 2/B * d; through a = A / max(||A||, eps): (g - a (a . g)) / ||A||, but below eps the clamp
        # passes no gradient to the norm, so there is no projection
        proj_s = tl.where(norm_s >= eps, tl.sum(proj, axis=0), 0.0)
        scale = 2.0 * inv_B * inv_s * inv_C
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < N
            a_s = tl.load(MAP_S + row + cols, mask=col_ok, other=0.0) * inv_s
            d = a_s - tl.load(MAP_T + row + cols, mask=col_ok, other=0.0) * inv_t
            tl.store(MAP_S + row + cols, scale * (d - a_s * proj_s), mask=col_ok)
    else:
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < N
            a_s = tl.load(MAP_S + row + cols, mask=col_ok, other=0.0)
            tl.store(MAP_S + row + cols, a_s * inv_s, mask=col_ok)
        tl.store(NORM_S + b, norm_s)


@triton.jit
def _sa_bwd_kernel(
        S, T, DS, LSE_S, LSE_T, G_DIST, W,
        C, N,
        s_sb, s_sc, s_sn, t_sb, t_sc, t_sn, d_sb, d_sc, d_sn,
        inv_tau, p, kl_grad_scale,
        DO_KL: tl.constexpr, DO_ATT: tl.constexpr, P_IS_TWO: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """ds for one (sample, channel block, position block) tile.

    DO_KL: + G_DIST * kl_grad_scale * (softmax(s/tau) - softmax(t/tau)), softmaxes from LSE_S, LSE_T (B, C).
    DO_ATT: + W[b, i] * d|s|^p/ds, W (B, N) being dL/dA^s / C with the upstream gradient already applied.
    """
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < C
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows[:, None].to(tl.int64)
    s = tl.load(S + b * s_sb + rows64 * s_sc + cols[None, :] * s_sn, mask=mask, other=0.0).to(tl.float32)
    ds = tl.zeros([BLOCK_C, BLOCK_N], tl.float32)
    if DO_KL:
        t = tl.load(T + b * t_sb + rows64 * t_sc + cols[None, :] * t_sn, mask=mask, other=0.0).to(tl.float32)
        lse_s = tl.load(LSE_S + b * C + rows, mask=row_ok, other=0.0)
        lse_t = tl.load(LSE_T + b * C + rows, mask=row_ok, other=0.0)
        coef = tl.load(G_DIST).to(tl.float32) * kl_grad_scale
        ds += coef * (tl.exp(s * inv_tau - lse_s[:, None]) - tl.exp(t * inv_tau - lse_t[:, None]))
    if DO_ATT:
        w = tl.load(W + b * N + cols, mask=col_ok, other=0.0)
        ds += w[None, :] * _abs_pow_grad(s, p, P_IS_TWO)
    tl.store(DS + b * d_sb + rows64 * d_sc + cols[None, :] * d_sn, ds.to(DS.dtype.element_ty), mask=mask)


def _flat(x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
    """x and its (batch, channel, position) strides, viewing (B, C, H, W) as (B, C, H*W) without a copy
    when the positions are one stride apart (NCHW and channels-last); other layouts are copied."""
    _, _, h, w = x.shape
    if w == 1:
        return x, (x.stride(0), x.stride(1), x.stride(2))
    if h == 1 or x.stride(2) == w * x.stride(3):
        return x, (x.stride(0), x.stride(1), x.stride(3))
    x = x.contiguous()
    return x, (x.stride(0), x.stride(1), x.stride(3))


def _on_device_of(x: torch.Tensor) -> ContextManager:
    # Triton launches on the current CUDA device, which need not be the one holding the tensors
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


class LaunchConfig(NamedTuple):
    """Tile and launch options of `_sa_fwd_kernel` and `_sa_bwd_kernel` for one (C, N, layout)."""
    block_c: int
    block_n: int
    num_warps: int
    num_stages: int


def launch_config(c: int, n: int, strides: Tuple[int, int, int]) -> LaunchConfig:
    """The launch of both kernels for C channels and N positions in the layout of ``strides``.

    BLOCK_C x BLOCK_N = _TILE elements (fewer for small maps) at 4 warps, the tile's long side along the contiguous
    dimension so that loads coalesce: NCHW 32 x 32, channels-last 64 x 16. Wide channel blocks keep the partial-sum
    buffer, 1/BLOCK_C of the |x|^p values, small.
    """
    channels_last = strides[1] < strides[2]
    block_c = min(triton.next_power_of_2(c), 64 if channels_last else 32)
    block_n = min(triton.next_power_of_2(n), _TILE // block_c)
    return LaunchConfig(block_c, block_n, _NUM_WARPS, _NUM_STAGES)


class _Stats(NamedTuple):
    """What the forward kernels leave behind for one call; None where the call did not ask for it."""
    lse_s: Optional[torch.Tensor]  # (B, C) log-sum-exp of s/tau per row
    lse_t: Optional[torch.Tensor]  # (B, C) same for t
    kl: Optional[torch.Tensor]  # (B, n_cblk) tau^2/(B*C)-scaled KL sums of the channel blocks
    map_s: Optional[torch.Tensor]  # (B, N) spatial_attention's maps, or spatial_kl_and_attention' dL_att/dA^s / C
    norm_s: Optional[torch.Tensor]  # (B,) ||A^s_b|| (spatial_attention only)
    att: Optional[torch.Tensor]  # (B,) ||a^s_b - a^t_b||^2 / B (spatial_kl_and_attention only)


def forward(s: torch.Tensor, t: Optional[torch.Tensor], tau: float, p: float, do_att: bool) -> _Stats:
    """Run the forward kernels: the softmax/KL part when t is given, the attention part when do_att."""
    s, s_strides = _flat(s)
    pair = t is not None
    t, t_strides = _flat(t) if pair else (None, (0, 0, 0))
    bsz, c, h, w = s.shape
    n = h * w
    cfg = launch_config(c, n, s_strides)
    n_cblk = triton.cdiv(c, cfg.block_c)
    f32 = dict(device=s.device, dtype=torch.float32)
    lse_s = torch.empty(bsz, c, **f32) if pair else None
    lse_t = torch.empty(bsz, c, **f32) if pair else None
    kl = torch.empty(bsz, n_cblk, **f32) if pair else None
    part_s = torch.empty(bsz, n_cblk, n, **f32) if do_att else None
    part_t = torch.empty(bsz, n_cblk, n, **f32) if do_att and pair else None
    map_s = torch.empty(bsz, n, **f32) if do_att else None
    map_t = torch.empty(bsz, n, **f32) if do_att and pair else None
    norm_s = torch.empty(bsz, **f32) if do_att and not pair else None
    att = torch.empty(bsz, **f32) if do_att and pair else None
    with _on_device_of(s):
        _sa_fwd_kernel[(bsz, n_cblk)](
            s, t, lse_s, lse_t, kl, part_s, part_t,
            c, n, *s_strides, *t_strides,
            1.0 / tau, float(p), tau * tau / (bsz * c),
            PAIR=pair, DO_ATT=do_att, P_IS_TWO=p == 2,
            BLOCK_C=cfg.block_c, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        if do_att:
            _attention_finish_kernel[(bsz,)](
                part_s, part_t, map_s, map_t, norm_s, att,
                n_cblk, n, 1.0 / c, 1.0 / bsz, NORM_EPS,
                PAIR=pair, BLOCK_N=min(triton.next_power_of_2(n), 1024), num_warps=_NUM_WARPS,
            )
    return _Stats(lse_s, lse_t, kl, map_s, norm_s, att)


def backward(
        s: torch.Tensor, t: Optional[torch.Tensor], lse_s: Optional[torch.Tensor], lse_t: Optional[torch.Tensor],
        g_dist: Optional[torch.Tensor], w: Optional[torch.Tensor], tau: float, p: float,
) -> torch.Tensor:
    """ds from the KL term (g_dist given: its upstream gradient) and the attention term (w: (B, N) dL/dA^s / C)."""
    s, s_strides = _flat(s)
    t, t_strides = _flat(t) if t is not None else (None, (0, 0, 0))
    bsz, c, h, wd = s.shape
    n = h * wd
    ds = torch.empty_like(s)
    _, d_strides = _flat(ds)
    cfg = launch_config(c, n, s_strides)
    with _on_device_of(s):
        _sa_bwd_kernel[(bsz, triton.cdiv(c, cfg.block_c), triton.cdiv(n, cfg.block_n))](
            s, t, ds, lse_s, lse_t, g_dist, w,
            c, n, *s_strides, *t_strides, *d_strides,
            1.0 / tau, float(p), tau / (bsz * c),
            DO_KL=g_dist is not None, DO_ATT=w is not None, P_IS_TWO=p == 2,
            BLOCK_C=cfg.block_c, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return ds

# ====================================================================================== the custom ops over them

# the kernels the launchers start: the compile report swaps them for recorders and compiles each launch
KERNELS = ('_sa_fwd_kernel', '_attention_finish_kernel', '_sa_bwd_kernel')
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
    proj = torch.where(norms_s >= NORM_EPS, (maps_s * d).sum(dim=1), 0.0)
    w = 2.0 / s.shape[0] * (d - maps_s * proj[:, None]) / (norms_s.clamp_min(NORM_EPS)[:, None] * s.shape[1])
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
    stats = forward(x, None, 1.0, p, do_att=True)
    return stats.map_s, stats.norm_s


def _triton_kl(s: Tensor, t: Tensor, tau: float) -> Tuple[Tensor, Tensor, Tensor]:
    stats = forward(s, t, tau, 2.0, do_att=False)
    return stats.kl.sum(), stats.lse_s, stats.lse_t


def _triton_kl_and_attention(s: Tensor, t: Tensor, tau: float, p: float) -> Tuple[Tensor, ...]:
    stats = forward(s, t, tau, p, do_att=True)
    return stats.kl.sum(), stats.att.sum(), stats.lse_s, stats.lse_t, stats.map_s


def _triton_ds(s: Tensor, t: Optional[Tensor], lse_s: Optional[Tensor], lse_t: Optional[Tensor],
               g_dist: Optional[Tensor], w: Optional[Tensor], tau: float, p: float) -> Tensor:
    ds = backward(s, t, lse_s, lse_t, g_dist, w, tau, p)
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
    proj = torch.where(norm >= NORM_EPS, (a * g).sum(dim=1), 0.0)
    w = (g - a * proj[:, None]) / (norm.clamp_min(NORM_EPS)[:, None] * x.shape[1])
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
# the Triton paths of the public ops (`timm_sadistill.ops`, which checks the arguments first), named like their
# formulas in `reference`; registered in the order the kernel benchmark times them, the op of SA's step first

@register_fused_op(kernels=KERNELS)
def spatial_kl_and_attention(s: Tensor, t: Tensor, tau: float = 4.0, p: float = 2.0,
                             strict: bool = True) -> Tuple[Tensor, Tensor]:
    """(L_dist, L_att), two float32 scalars, from one read of s and t (forward) and one of s, t plus a write of
    ds (backward); t takes no gradient."""
    dist, att, *_ = _kl_and_attention_fwd(s, t.detach(), float(tau), float(p), strict)
    return dist, att


@register_fused_op(kernels=KERNELS)
def spatial_kl(s: Tensor, t: Tensor, tau: float = 4.0, strict: bool = True) -> Tensor:
    """Scalar tau^2/(B*C) * sum_{b,c} KL(softmax_i(t_bc/tau) || softmax_i(s_bc/tau)); t takes no gradient."""
    return _kl_fwd(s, t.detach(), float(tau), strict)[0]


@register_fused_op(kernels=KERNELS)
def spatial_attention(x: Tensor, p: float = 2.0, strict: bool = True) -> Tensor:
    """(B, C, H, W) -> (B, H*W) float32 maps: mean_c |x|^p, L2-normalised over the positions."""
    return _attention_fwd(x, float(p), strict)[0]
