"""The compile report of the Triton kernels, as a command: every launch the registered ops make, compiled for sm_80
and sm_90 (or this machine's GPU) without a GPU, with the registers, spills and occupancy of each, as a markdown
table. The work is `timm_sadistill.ops.compile_report` (docs/kernels.md says how it records the launches).

    python benchmarks/kernel_compile.py [--arch 80 90] [--jobs 2] [--shapes 'odd sizes' ...] [--out report.md]

Under TRITON_INTERPRET=1 it runs the compile in a subprocess without it. benchmarks/kernels.py and
benchmarks/gpu_check.sh call it.
"""
import argparse
import os
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's package, without an install

from timm_sadistill.ops.compile_report import (ARCHS, MAX_REGS, SHAPES, Row, compile_report,  # noqa: E402
                                               problems, run_report)


def markdown(rows: Sequence[Row]) -> List[str]:
    """The report as a markdown table, one line per kernel specialisation and target."""
    lines = ['| kernel | sm | BLOCK_C x BLOCK_N | warps | stages | regs | spill B | blocks/SM | warps/SM | flags '
             '| dtypes | layouts | shapes |', '|---|---|---|---:|---:|---:|---:|---:|---:|---|---|---|---|']
    for row in sorted(rows, key=lambda r: (r.kernel, r.arch, -r.regs)):
        c = row.constexprs
        tile = f"{c.get('BLOCK_C', '-')} x {c['BLOCK_N']}"
        flags = ' '.join(f'{k}={int(v)}' for k, v in c.items() if not k.startswith('BLOCK_'))
        regs = 'error' if row.error else str(row.regs)
        lines.append(f'| {row.kernel} | {row.arch} | {tile} | {row.num_warps} | {row.num_stages} | {regs} | '
                     f'{row.spill_bytes} | {row.blocks_per_sm} | {row.warps_per_sm} | {flags} | '
                     f"{', '.join(row.dtypes)} | {', '.join(row.layouts)} | {', '.join(row.shapes)} |")
    return lines


def _native_arch() -> int:
    import torch
    major, minor = torch.cuda.get_device_capability()
    return 10 * major + minor


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--arch', nargs='+', default=list(map(str, ARCHS)),
                        help="compute capabilities (80: A100, 90: H100), or 'native': this machine's GPU")
    parser.add_argument('--jobs', type=int, default=2, help='compile processes')
    parser.add_argument('--shapes', nargs='+', choices=list(SHAPES), help='only these shapes (default: all)')
    parser.add_argument('--out', help='also write the markdown table to this file')
    args = parser.parse_args(argv)
    args.arch = [_native_arch() if arch == 'native' else int(arch) for arch in args.arch]
    matrix = {'shapes': {name: SHAPES[name] for name in args.shapes}} if args.shapes else {}
    begin = time.perf_counter()
    if os.environ.get('TRITON_INTERPRET', '0') == '1':
        rows = compile_report(args.arch, args.jobs, **matrix)
    else:
        rows = run_report(args.arch, args.jobs, **matrix)
    import triton
    lines = [f'# Triton kernels compiled for sm_{", sm_".join(map(str, args.arch))} (triton {triton.__version__}, '
             f'{len(rows)} specialisations, {time.perf_counter() - begin:.0f} s)', '', *markdown(rows), '']
    found = problems(rows)
    lines += [f'Over the limit (compile, no spill, at most {MAX_REGS} registers):', *[f'- {p}' for p in found]] \
        if found else [f'Every specialisation compiles, spills nothing and takes at most {MAX_REGS} registers.']
    text = '\n'.join(lines) + '\n'
    sys.stdout.write(text)
    if args.out:
        Path(args.out).write_text(text)
    return 1 if found else 0


if __name__ == '__main__':
    sys.exit(main())
