"""Forward + backward time and peak memory of one SA stage loss (L_dist + L_att), per implementation.

Rows: the eager PyTorch reference, `torch.compile` of it, and the fused Triton ops (GPU only), each timed in the
same run so the ratios to eager compare like with like. On a GPU it also reports the achieved bandwidth over
the bytes that have to move (forward reads s and t; backward reads s and t and writes ds: 5 * B*C*H*W *
itemsize) as a fraction of the device peak.

    python benchmarks/kernels.py [--small] [--batch 64 256] [--peak-gbs 4800] [--out results.md]

Beside each Triton row: the registers a thread of its forward and backward kernels take and the occupancy they
allow (blocks and warps an SM), from `kernel_compile`'s report of those launches for the device's compute
capability (sm_90 without a GPU).

On a CPU it runs small shapes (eager vs compiled) and says that the Triton rows need a GPU; ``--triton-on-cpu``
adds them through the interpreter (TRITON_INTERPRET=1) so that the whole report runs (gpu_check.sh --dry-run).
After the table, the Triton rows against the targets a fused kernel has to meet to be worth its code (speedups,
share of the HBM peak, extra memory in feature maps), misses marked.
"""
import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

import kernel_compile  # first: it puts the checkout's package on sys.path
from timm_sadistill import ops
from timm_sadistill.ops import reference

# (C, H, W, channels_last) of ResNet-50 stages 2-4 (NCHW) and of a ViT-B/16 token grid at 224 px: its (B, N, C)
# tokens viewed as (B, C, H, W) without a copy are channels-last
GPU_SHAPES = {
    'resnet50 stage 2': (512, 28, 28, False),
    'resnet50 stage 3': (1024, 14, 14, False),
    'resnet50 stage 4': (2048, 7, 7, False),
    'vit-b/16 tokens': (768, 14, 14, True),
}
CPU_SHAPES = {
    'resnet50 stage 2 (C/8)': (64, 28, 28, False),
    'resnet50 stage 4 (C/8)': (256, 7, 7, False),
    'vit-b/16 tokens (C/8)': (96, 14, 14, True),
}
# HBM peak in GB/s (vendor datasheets), matched in this order against torch.cuda.get_device_name(): the more
# specific names first, since "NVIDIA H100 PCIe" also contains "H100"
PEAK_GBS = {
    'H200': 4800.0,  # HBM3e, SXM and NVL
    'H100 PCIe': 2000.0,
    'H100 NVL': 3900.0,
    'H100': 3350.0,  # SXM
    'A100 80GB PCIe': 1935.0,
    'A100-SXM4-80GB': 2039.0,
    'A100': 1555.0,  # 40 GB
    'L40S': 864.0,
    'L4': 300.0,
}
# what the Triton row must reach (forward + backward, bf16) to be worth its code over torch.compile: speedup vs
# eager, vs torch.compile, share of the HBM peak (the op is bandwidth-bound), extra memory in feature maps (one map
# of s's size and dtype)
TARGETS = {'vs eager': 3.0, 'vs compile': 1.3, 'of peak': 0.60, 'feature maps': 1.0}

Step = Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]


def _fwd_bwd(fn: Step, s: torch.Tensor, t: torch.Tensor) -> None:
    # a fresh .grad each time, so the timing has no gradient accumulation in it
    s.grad = None
    dist, att = fn(s, t)
    (dist + att).backward()


def _time_ms(fn: Step, s: torch.Tensor, t: torch.Tensor, warmup: int, iters: int) -> float:
    """Median of `iters` timed steps: robust to a busy machine and to the odd allocator or clock hiccup."""
    for _ in range(warmup):
        _fwd_bwd(fn, s, t)
    times = []
    for _ in range(iters):
        if s.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            _fwd_bwd(fn, s, t)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            _fwd_bwd(fn, s, t)
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def _peak_mib(fn: Step, s: torch.Tensor, t: torch.Tensor) -> Optional[float]:
    """Peak memory one step allocates on top of what was already allocated (the inputs), in MiB."""
    if not s.is_cuda:
        return None
    s.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _fwd_bwd(fn, s, t)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def _peak_gbs(arg: Optional[float]) -> Optional[float]:
    if arg is not None:
        return arg
    name = torch.cuda.get_device_name()
    return next((gbs for key, gbs in PEAK_GBS.items() if key in name), None)


def _registers(shapes: Dict[str, Tuple[int, int, int, bool]], dtype: torch.dtype, p: float,
               cuda: bool) -> Dict[Tuple[str, str], str]:
    """(stage, layout) -> 'fwd R (blocks/warps an SM), bwd R (...)' of the fused op's forward and backward kernels."""
    major, minor = torch.cuda.get_device_capability() if cuda else divmod(kernel_compile.ARCHS[-1], 10)
    rows = kernel_compile.compile_report(
        [10 * major + minor], jobs=os.cpu_count() or 2, dtypes=[str(dtype).split('.')[-1]], ps=[p],
        shapes={stage: (c, h, w) for stage, (c, h, w, _) in shapes.items()})
    found = {}
    for row in rows:
        flags = row.constexprs
        role = ('fwd' if row.kernel == '_sa_fwd_kernel' and flags.get('PAIR') and flags.get('DO_ATT') else
                'bwd' if row.kernel == '_sa_bwd_kernel' and flags.get('DO_KL') and flags.get('DO_ATT') else None)
        if role is None:
            continue
        for stage in row.shapes:
            for layout in row.layouts:
                found.setdefault((stage, layout), {})[role] = \
                    f'{role} {row.regs} ({row.blocks_per_sm}/{row.warps_per_sm})'
    return {key: ', '.join(v[r] for r in ('fwd', 'bwd') if r in v) for key, v in found.items()}


def _fmt(value: Optional[float], spec: str) -> str:
    return 'n/a' if value is None else format(value, spec)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--small', action='store_true', help='small CPU-sized shapes (automatic without a GPU)')
    parser.add_argument('--batch', type=int, nargs='+', help='batch sizes (default 64 256 on GPU, 4 with --small)')
    parser.add_argument('--dtype', choices=['bfloat16', 'float16', 'float32'],
                        help='feature dtype (default bfloat16 on GPU, float32 on CPU)')
    parser.add_argument('--tau', type=float, default=4.0)
    parser.add_argument('--p', type=float, default=2.0)
    parser.add_argument('--iters', type=int, help='timed iterations, median reported (default 20 on GPU, 10 on CPU)')
    parser.add_argument('--peak-gbs', type=float, help=f'device peak bandwidth in GB/s (default by name: {PEAK_GBS})')
    parser.add_argument('--threads', type=int, default=1,
                        help='CPU threads (default 1: OpenMP on a small or shared machine is mostly noise)')
    parser.add_argument('--no-compile', action='store_true', help='skip the torch.compile rows')
    parser.add_argument('--triton-on-cpu', action='store_true',
                        help='CPU with TRITON_INTERPRET=1: add the Triton rows through the interpreter, to run the '
                             "report's code (their times mean nothing)")
    parser.add_argument('--out', help='also write the markdown table to this file')
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device('cuda' if cuda else 'cpu')
    small = args.small or not cuda
    shapes = CPU_SHAPES if small else GPU_SHAPES
    batches = args.batch or ([4] if small else [64, 256])
    dtype = getattr(torch, args.dtype or ('bfloat16' if cuda else 'float32'))
    iters = args.iters or (20 if cuda else 10)
    peak = _peak_gbs(args.peak_gbs) if cuda else None
    tau, p = args.tau, args.p
    if not cuda:
        torch.set_num_threads(args.threads)

    impls: Dict[str, Step] = {'eager': lambda s, t: reference.spatial_kl_and_attention(s, t, tau, p)}
    if cuda or args.triton_on_cpu:
        impls['triton'] = lambda s, t: ops.spatial_kl_and_attention(s, t, tau, p, backend='triton')
    if not args.no_compile:
        # last, so its compile time cannot hold up the other rows; one graph per shape (no dynamic-shape
        # kernels), so each row gets the kernel it would in training
        impls['torch.compile'] = torch.compile(lambda s, t: reference.spatial_kl_and_attention(s, t, tau, p), dynamic=False)

    env = f'{torch.cuda.get_device_name() if cuda else f"CPU, {args.threads} thread(s)"}, torch {torch.__version__}'
    try:
        import triton
        env += f', triton {triton.__version__}'
    except ImportError:
        pass
    header = [
        f'# SA stage loss (L_dist + L_att), forward + backward, {dtype} ({env})',
        '',
        '| shape (B, C, H, W) | stage | impl | ms | speedup vs eager | peak extra MiB | memory vs eager '
        '| GB/s | % of peak | regs (blocks/warps an SM) |',
        '|---|---|---|---:|---:|---:|---:|---:|---:|---|',
    ]
    # rows go out as they are measured, to stdout and --out, so a run cut short still leaves its table
    out = open(args.out, 'w') if args.out else None

    def emit(*lines: str) -> None:
        for stream in (sys.stdout, out):
            if stream is not None:
                stream.write(''.join(line + '\n' for line in lines))
                stream.flush()

    registers = _registers(shapes, dtype, p, cuda) if 'triton' in impls else {}
    emit(*header)
    summary = []  # (shape, Triton vs eager, vs compile, share of peak, extra memory in feature maps)
    for bsz in batches:
        for stage, (c, h, w, channels_last) in shapes.items():
            g = torch.Generator(device=device).manual_seed(0)
            layout = torch.channels_last if channels_last else torch.contiguous_format
            s, t = (torch.randn(bsz, c, h, w, generator=g, device=device).to(dtype, memory_format=layout)
                    for _ in range(2))
            s.requires_grad_()
            moved = 5 * s.numel() * s.element_size()
            eager_ms = eager_mib = None
            measured = {}
            for name, fn in impls.items():
                ms = _time_ms(fn, s, t, warmup=3, iters=iters)
                mib = _peak_mib(fn, s, t)
                measured[name] = ms, mib
                if name == 'eager':
                    eager_ms, eager_mib = ms, mib
                gbs = moved / ms / 1e6 if cuda else None
                shape = f'({bsz}, {c}, {h}, {w})' + (' NHWC' if channels_last else '')
                row = [
                    shape, stage, name, f'{ms:.3f}', f'{eager_ms / ms:.2f}x',
                    _fmt(mib, '.0f'), _fmt(mib / eager_mib if mib is not None and eager_mib else None, '.2f'),
                    _fmt(gbs, '.0f'), _fmt(gbs / peak * 100 if gbs is not None and peak else None, '.0f'),
                    registers.get((stage, 'channels_last' if channels_last else 'nchw'), 'n/a')
                    if name == 'triton' else '',
                ]
                emit('| ' + ' | '.join(row) + ' |')
            if 'triton' in measured:
                ms, mib = measured['triton']
                compiled = measured.get('torch.compile', (None,))[0]
                summary.append((shape, eager_ms / ms, compiled / ms if compiled else None,
                                moved / ms / 1e6 / peak if peak else None,
                                mib * 2 ** 20 / (moved / 5) if mib is not None else None))
            del s, t
    if summary:
        def verdict(value: Optional[float], target: float, at_least: bool = True) -> str:
            if value is None:
                return 'n/a'
            met = value >= target if at_least else value <= target
            return f'{value:.2f}' + ('' if met else ' **(miss)**')

        emit('', f"Targets for Triton: ≥ {TARGETS['vs eager']:g}x eager, ≥ {TARGETS['vs compile']:g}x "
                 f"torch.compile, ≥ {TARGETS['of peak']:.0%} of the HBM peak, extra memory ≤ "
                 f"{TARGETS['feature maps']:g} feature map (ds itself is one).", '',
             '| shape | × eager | × torch.compile | share of peak | extra memory (feature maps) |',
             '|---|---:|---:|---:|---:|')
        for shape, vs_eager, vs_compile, share, maps in summary:
            emit(f"| {shape} | {verdict(vs_eager, TARGETS['vs eager'])} | "
                 f"{verdict(vs_compile, TARGETS['vs compile'])} | {verdict(share, TARGETS['of peak'])} | "
                 f"{verdict(maps, TARGETS['feature maps'], at_least=False)} |")
    if args.triton_on_cpu and not cuda:
        emit('', 'Triton rows: the CPU interpreter (--triton-on-cpu), run to exercise the code; their times mean '
                 'nothing.')
    elif not cuda:
        emit('', 'The Triton rows need a CUDA GPU; on a CPU the kernels only run (slowly) in the interpreter, '
                 'which says nothing about their speed. Memory is n/a on CPU.')
    if out is not None:
        out.close()


if __name__ == '__main__':
    sys.exit(main())
