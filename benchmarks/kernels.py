"""Forward + backward time and peak memory of each registered fused op (`timm_sadistill.ops.op_registry`), per
implementation.

Rows, for every op (or those of ``--ops``): its eager PyTorch formula (`ops.reference`), `torch.compile` of it, and
the fused Triton op (GPU only), each timed in the same run so the ratios to eager compare like with like. The
backward is that of the sum of the op's outputs. On a GPU it also reports the achieved bandwidth over the bytes that
have to move (forward reads each feature map; backward reads them again and writes the student's gradient:
(2 * maps + 1) * B*C*H*W * itemsize, 5x for the SA pair) as a fraction of the device peak.

    python benchmarks/kernels.py [--small] [--ops spatial_kl_and_attention] [--batch 64 256] [--out results.md]

Beside each Triton row: the registers a thread of each kernel the op launches takes (the most over its launches)
and the occupancy it allows (blocks and warps an SM), from the compile report
(`timm_sadistill.ops.compile_report`) of those launches for the device's compute capability (sm_90 without a GPU).

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
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's package, without an install

from timm_sadistill import ops  # noqa: E402
from timm_sadistill.ops import compile_report, dispatch, op_registry, reference  # noqa: E402

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

Step = Callable[..., object]
TABLE_HEADER = ('| shape (B, C, H, W) | stage | impl | ms | speedup vs eager | peak extra MiB | memory vs eager | GB/s '
                '| % of peak | regs (blocks/warps an SM) |', '|---|---|---|---:|---:|---:|---:|---:|---:|---|')


def _fwd_bwd(fn: Step, args: tuple) -> None:
    # a fresh .grad each time, so the timing has no gradient accumulation in it
    args[0].grad = None
    outputs = fn(*args)
    sum(o.float().sum() for o in (outputs if isinstance(outputs, tuple) else (outputs,))).backward()


def _time_ms(fn: Step, args: tuple, warmup: int, iters: int) -> float:
    """Median of `iters` timed steps: robust to a busy machine and to the odd allocator or clock hiccup."""
    for _ in range(warmup):
        _fwd_bwd(fn, args)
    times = []
    for _ in range(iters):
        if args[0].is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            _fwd_bwd(fn, args)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            _fwd_bwd(fn, args)
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def _peak_mib(fn: Step, args: tuple) -> Optional[float]:
    """Peak memory one step allocates on top of what was already allocated (the inputs), in MiB."""
    if not args[0].is_cuda:
        return None
    args[0].grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _fwd_bwd(fn, args)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def _peak_gbs(arg: Optional[float]) -> Optional[float]:
    if arg is not None:
        return arg
    name = torch.cuda.get_device_name()
    return next((gbs for key, gbs in PEAK_GBS.items() if key in name), None)


def _registers(names: Sequence[str], shapes: Dict[str, Tuple[int, int, int, bool]], dtype: torch.dtype, p: float,
               cuda: bool) -> Dict[Tuple[str, str, str], str]:
    """(op, stage, layout) -> 'kernel R (blocks/warps an SM), ...': each kernel the op launches there, at the most
    registers over its launches (forward and backward cases)."""
    major, minor = torch.cuda.get_device_capability() if cuda else divmod(compile_report.ARCHS[-1], 10)
    rows = compile_report.compile_report(
        [10 * major + minor], jobs=os.cpu_count() or 2, dtypes=[str(dtype).split('.')[-1]], ps=[p],
        shapes={stage: (c, h, w) for stage, (c, h, w, _) in shapes.items()})
    worst: Dict[Tuple[str, str, str], Dict[str, compile_report.Row]] = {}
    for row in rows:
        for name, stage, layout in ((n, st, la) for n in row.ops if n in names for st in row.shapes
                                    for la in row.layouts):
            kernels = worst.setdefault((name, stage, layout), {})
            if row.kernel not in kernels or row.regs > kernels[row.kernel].regs:
                kernels[row.kernel] = row
    order = {name: op.kernels for name, op in op_registry.fused_ops().items()}  # the Triton file's order
    return {key: ', '.join(f'{k} {r.regs} ({r.blocks_per_sm}/{r.warps_per_sm})'
                           for k, r in sorted(kernels.items(), key=lambda kr: order[key[0]].index(kr[0])))
            for key, kernels in worst.items()}


def _fmt(value: Optional[float], spec: str) -> str:
    return 'n/a' if value is None else format(value, spec)


def _parse(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--ops', nargs='+', choices=list(op_registry.fused_ops()),
                        help='only these ops (default: every registered one, in the order registered)')
    parser.add_argument('--small', action='store_true', help='small CPU-sized shapes (automatic without a GPU)')
    parser.add_argument('--batch', type=int, nargs='+', help='batch sizes (default 64 256 on GPU, 4 with --small)')
    parser.add_argument('--dtype', choices=['bfloat16', 'float16', 'float32'],
                        help='feature dtype (default bfloat16 on GPU, float32 on CPU)')
    parser.add_argument('--tau', type=float, default=4.0, help='tau of the ops that take it')
    parser.add_argument('--p', type=float, default=2.0, help='p of the ops that take it')
    parser.add_argument('--iters', type=int, help='timed iterations, median reported (default 20 on GPU, 10 on CPU)')
    parser.add_argument('--peak-gbs', type=float, help=f'device peak bandwidth in GB/s (default by name: {PEAK_GBS})')
    parser.add_argument('--threads', type=int, default=1,
                        help='CPU threads (default 1: OpenMP on a small or shared machine is mostly noise)')
    parser.add_argument('--no-compile', action='store_true', help='skip the torch.compile rows')
    parser.add_argument('--triton-on-cpu', action='store_true',
                        help='CPU with TRITON_INTERPRET=1: add the Triton rows through the interpreter, to run the '
                             "report's code (their times mean nothing)")
    parser.add_argument('--out', help='also write the markdown table to this file')
    return parser.parse_args(argv)


def _implementations(name: str, args: argparse.Namespace, cuda: bool) -> Dict[str, Step]:
    """eager (the formula), triton (the fused op, on a GPU or with --triton-on-cpu), torch.compile of the formula."""
    formula = getattr(reference, name)
    impls: Dict[str, Step] = {'eager': formula}
    if cuda or args.triton_on_cpu:
        op = getattr(ops, name)
        impls['triton'] = lambda *a: op(*a, backend='triton')
    if not args.no_compile:
        # last, so its compile time cannot hold up the other rows; one graph per shape (no dynamic-shape
        # kernels), so each row gets the kernel it would in training
        impls['torch.compile'] = torch.compile(formula, dynamic=False)
    return impls


def _op_args(name: str, bsz: int, c: int, h: int, w: int, channels_last: bool, dtype: torch.dtype,
             device: torch.device, args: argparse.Namespace) -> tuple:
    """The op's arguments: its feature maps (the student, which takes the gradient, first) and its scalars."""
    spec = dispatch.op_specs()[name]
    g = torch.Generator(device=device).manual_seed(0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    maps = [torch.randn(bsz, c, h, w, generator=g, device=device).to(dtype, memory_format=layout)
            for _ in spec.tensors]
    maps[0].requires_grad_()
    return dispatch.example_args(spec, maps, tau=args.tau, p=args.p)


def _verdict(value: Optional[float], target: float, at_least: bool = True) -> str:
    if value is None:
        return 'n/a'
    met = value >= target if at_least else value <= target
    return f'{value:.2f}' + ('' if met else ' **(miss)**')


def _summary(summary: List[tuple]) -> List[str]:
    """The Triton rows against TARGETS."""
    lines = ['', f"Targets for Triton: ≥ {TARGETS['vs eager']:g}x eager, ≥ {TARGETS['vs compile']:g}x "
                 f"torch.compile, ≥ {TARGETS['of peak']:.0%} of the HBM peak, extra memory ≤ "
                 f"{TARGETS['feature maps']:g} feature map (the gradient itself is one).", '',
             '| shape | × eager | × torch.compile | share of peak | extra memory (feature maps) |',
             '|---|---:|---:|---:|---:|']
    for shape, vs_eager, vs_compile, share, maps in summary:
        lines.append(f"| {shape} | {_verdict(vs_eager, TARGETS['vs eager'])} | "
                     f"{_verdict(vs_compile, TARGETS['vs compile'])} | {_verdict(share, TARGETS['of peak'])} | "
                     f"{_verdict(maps, TARGETS['feature maps'], at_least=False)} |")
    return lines


def _measure(name: str, shape: str, stage: str, op_args: tuple, impls: Dict[str, Step], registers: Dict,
             layout: str, iters: int, peak: Optional[float]) -> Tuple[List[str], Optional[tuple]]:
    """The table rows of one op at one shape, and its summary line (None without a Triton row)."""
    x = op_args[0]
    moved = (2 * sum(isinstance(a, torch.Tensor) for a in op_args) + 1) * x.numel() * x.element_size()
    lines, measured = [], {}
    for impl, fn in impls.items():
        ms = _time_ms(fn, op_args, warmup=3, iters=iters)
        mib = _peak_mib(fn, op_args)
        measured[impl] = ms, mib
        eager_ms, eager_mib = measured['eager']
        gbs = moved / ms / 1e6 if x.is_cuda else None
        row = [
            shape, stage, impl, f'{ms:.3f}', f'{eager_ms / ms:.2f}x',
            _fmt(mib, '.0f'), _fmt(mib / eager_mib if mib is not None and eager_mib else None, '.2f'),
            _fmt(gbs, '.0f'), _fmt(gbs / peak * 100 if gbs is not None and peak else None, '.0f'),
            registers.get((name, stage, layout), 'n/a') if impl == 'triton' else '',
        ]
        lines.append('| ' + ' | '.join(row) + ' |')
    if 'triton' not in measured:
        return lines, None
    (ms, mib), eager_ms = measured['triton'], measured['eager'][0]
    compiled = measured.get('torch.compile', (None,))[0]
    return lines, (shape, eager_ms / ms, compiled / ms if compiled else None,
                   moved / ms / 1e6 / peak if peak else None, mib * 2 ** 20 / x.nbytes if mib is not None else None)


def main(argv: Optional[List[str]] = None) -> None:
    args = _parse(argv)
    cuda = torch.cuda.is_available()
    device = torch.device('cuda' if cuda else 'cpu')
    small = args.small or not cuda
    shapes = CPU_SHAPES if small else GPU_SHAPES
    batches = args.batch or ([4] if small else [64, 256])
    dtype = getattr(torch, args.dtype or ('bfloat16' if cuda else 'float32'))
    iters = args.iters or (20 if cuda else 10)
    peak = _peak_gbs(args.peak_gbs) if cuda else None
    names = args.ops or list(op_registry.fused_ops())
    if not cuda:
        torch.set_num_threads(args.threads)
    env = f'{torch.cuda.get_device_name() if cuda else f"CPU, {args.threads} thread(s)"}, torch {torch.__version__}'
    if ops.triton_available():
        import triton
        env += f', triton {triton.__version__}'
    # rows go out as they are measured, to stdout and --out, so a run cut short still leaves its table
    out = open(args.out, 'w') if args.out else None

    def emit(*lines: str) -> None:
        for stream in (sys.stdout, out):
            if stream is not None:
                stream.write(''.join(line + '\n' for line in lines))
                stream.flush()

    registers = _registers(names, shapes, dtype, args.p, cuda) if cuda or args.triton_on_cpu else {}
    emit(f'# Fused ops, forward + backward, {dtype} ({env})')
    # one section an op, its verdicts after its rows: a run cut short keeps the ops it finished
    for name in names:
        emit('', f'## {name}', '', *TABLE_HEADER)
        summary = []
        impls = _implementations(name, args, cuda)
        for bsz in batches:
            for stage, (c, h, w, channels_last) in shapes.items():
                op_args = _op_args(name, bsz, c, h, w, channels_last, dtype, device, args)
                shape = f'({bsz}, {c}, {h}, {w})' + (' NHWC' if channels_last else '')
                lines, line = _measure(name, shape, stage, op_args, impls, registers,
                                       'channels_last' if channels_last else 'nchw', iters, peak)
                emit(*lines)
                summary += [line] if line else []
                del op_args
        if summary:
            emit(*_summary(summary))
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
