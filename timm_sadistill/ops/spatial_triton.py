"""Fused Triton kernels for the SA ops and their launchers, `forward` and `backward`.

Shapes: s (student), t (teacher) and x are (B, C, H, W) float32 / float16 / bfloat16 tensors; N = H*W. The
public, validated entry is `timm_sadistill.ops` (device, dtype and shape checks live there); the custom ops and
their autograd are `spatial_custom_ops`. All arithmetic is float32; gradients come back in the input dtype and
layout.

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
"""
import contextlib
from typing import ContextManager, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

__all__ = ['LaunchConfig', 'NORM_EPS', 'backward', 'forward', 'launch_config']

# F.normalize's default: the smallest norm an attention map is divided by
NORM_EPS = 1e-12
# elements per (BLOCK_C, BLOCK_N) tile: 8 values a thread and input at 4 warps. At 16 (a 2048-element tile) the
# paired forward takes 255 registers a thread on sm_80 and sm_90 when the rows are not 16-aligned (NCHW with H*W
# not a multiple of 16: ResNet-50 stages 3 and 4, ViT grids), which leaves 2 blocks (8 warps) an SM; at 8 every
# launch stays within 128 registers without spills (benchmarks/kernel_compile.py, docs/kernels.md)
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
