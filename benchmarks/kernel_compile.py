"""Compile every Triton launch the public SA ops make, for sm_80 and sm_90, on a machine without a GPU, and report
the registers, spills and occupancy of each.

Triton's compiler and the ptxas it ships build a kernel for any target without a device, so this checks what the
interpreter (the CPU tests) cannot: that each specialisation the ops launch compiles, and what it costs in
registers. The launches are recorded, not listed: the kernel layer (`timm_sadistill.ops.spatial_triton`) runs with
its kernels swapped for recorders, on small CPU tensors of the real channel and position counts (the batch size
reaches the kernels only through the grid), for each public op's forward and the backward cases its autograd
takes. Each recorded launch is specialised as Triton's JIT would specialise it (its own binder: argument types,
16-divisibility, strides equal to 1), duplicates are compiled once, and the registers and stack frame (spills) come
from the compiled cubin (``cuobjdump --dump-resource-usage``).

Occupancy per SM, from the registers and the launch (warps a block, shared memory): blocks = min(32, 64 // warps,
65536 // (warps * 32 * regs rounded up to 8), shared memory / (shared + 1 KiB)), warps = blocks * warps a block.

    python benchmarks/kernel_compile.py [--arch 80 90] [--jobs 2] [--shapes 'odd sizes' ...] [--out report.md]

The compile must not run under the interpreter: `compile_report` runs it in a subprocess without TRITON_INTERPRET
(the tests export TRITON_INTERPRET=1), which is how tests/test_kernel_compile.py, benchmarks/kernels.py and
benchmarks/gpu_check.sh call it.
"""
import argparse
import contextlib
import inspect
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's package, without an install
ARCHS = (80, 90)
MAX_REGS = 128  # a thread's registers the launch configuration must stay within (4 blocks of 4 warps an SM)
# (C, H, W) of the maps the ops see: ResNet-50's stages at 224 px, a ViT-B/16 token grid, and the edge cases
SHAPES: Dict[str, Tuple[int, int, int]] = {
    'resnet50 stage 1': (256, 56, 56),
    'resnet50 stage 2': (512, 28, 28),
    'resnet50 stage 3': (1024, 14, 14),
    'resnet50 stage 4': (2048, 7, 7),
    'vit-b/16 tokens': (768, 14, 14),
    'odd sizes': (3, 5, 7),
    '1x1 maps': (3, 1, 1),
}
DTYPES = ('float32', 'float16', 'bfloat16')
LAYOUTS = ('nchw', 'channels_last')
PS = (2.0, 1.5)
# each public op: its forward (PAIR: s and t, DO_ATT: the attention part) and the backward cases its autograd
# launches (DO_KL, DO_ATT): spatial_kl_and_attention's backward skips the half of a term that took no gradient
OP_LAUNCHES: Dict[str, Tuple[Tuple[bool, bool], Tuple[Tuple[bool, bool], ...]]] = {
    'spatial_attention': ((False, True), ((False, True),)),
    'spatial_kl': ((True, False), ((True, False),)),
    'spatial_kl_and_attention': ((True, True), ((True, True), (True, False), (False, True))),
}
# shared memory an SM offers blocks (KiB): A100 / H100
SHARED_KIB = {80: 164, 90: 228}


@dataclass
class Launch:
    """One recorded launch: which op, at what, of which kernel with which arguments."""
    op: str
    shape: str
    dtype: str
    layout: str
    p: float
    kernel: str
    args: tuple
    kwargs: dict


@dataclass
class Row:
    """One compiled specialisation and every op, shape, dtype, layout and p that launches it."""
    kernel: str
    arch: int
    ops: List[str]
    shapes: List[str]
    dtypes: List[str]
    layouts: List[str]
    ps: List[float]
    constexprs: Dict[str, Any]
    num_warps: int
    num_stages: int
    regs: int = -1
    spill_bytes: int = -1
    shared_bytes: int = -1
    blocks_per_sm: int = 0
    warps_per_sm: int = 0
    seconds: float = 0.0
    error: Optional[str] = None


def occupancy(regs: int, num_warps: int, shared_bytes: int, arch: int) -> Tuple[int, int]:
    """(blocks, warps) an SM holds at once: 64K registers (allocated 256 a warp at a time), 64 warps, 32 blocks,
    and its shared memory."""
    per_warp = -(-regs * 32 // 256) * 256
    blocks = min(32, 64 // num_warps, 65536 // (num_warps * per_warp))
    if shared_bytes > 0:
        blocks = min(blocks, SHARED_KIB[arch] * 1024 // (shared_bytes + 1024))
    return blocks, blocks * num_warps


class _Recorder:
    """Stands in for a JIT kernel: ``kernel[grid](*args, **kwargs)`` records the call instead of launching."""

    def __init__(self, name: str, sink: List[Tuple[str, tuple, dict]]):
        self.name, self.sink = name, sink

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.sink.append((self.name, args, kwargs))


KERNELS = ('_sa_fwd_kernel', '_attention_finish_kernel', '_sa_bwd_kernel')


@contextlib.contextmanager
def _recording(sink: List[Tuple[str, tuple, dict]]) -> Iterator[None]:
    from timm_sadistill.ops import spatial_triton
    saved = {name: getattr(spatial_triton, name) for name in KERNELS}
    try:
        for name in KERNELS:
            setattr(spatial_triton, name, _Recorder(name, sink))
        yield
    finally:
        for name, kernel in saved.items():
            setattr(spatial_triton, name, kernel)


def record_launches(shapes: Dict[str, Tuple[int, int, int]] = SHAPES, dtypes: Sequence[str] = DTYPES,
                    layouts: Sequence[str] = LAYOUTS, ps: Sequence[float] = PS, batch: int = 1) -> List[Launch]:
    """Every kernel launch of every public op (forward and its backward cases) at each shape, dtype, layout, p."""
    import torch
    from timm_sadistill.ops import spatial_triton
    launches = []
    for shape_name, (c, h, w) in shapes.items():
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            for layout in layouts:
                memory_format = torch.channels_last if layout == 'channels_last' else torch.contiguous_format
                s = torch.empty(batch, c, h, w, dtype=dtype, memory_format=memory_format)
                t = torch.empty_like(s)
                for p in ps:
                    for op, ((pair, fwd_att), backward_cases) in OP_LAUNCHES.items():
                        if p != 2.0 and not fwd_att:
                            continue  # p reaches only the attention part
                        sink: List[Tuple[str, tuple, dict]] = []
                        with _recording(sink):
                            spatial_triton.forward(s, t if pair else None, 4.0, p, do_att=fwd_att)
                            f32 = dict(dtype=torch.float32)
                            lse = torch.zeros(batch, c, **f32)
                            for do_kl, do_att in backward_cases:
                                spatial_triton.backward(
                                    s, t if do_kl else None, lse if do_kl else None, lse if do_kl else None,
                                    torch.ones((), **f32) if do_kl else None,
                                    torch.zeros(batch, h * w, **f32) if do_att else None, 4.0, p)
                        launches += [Launch(op, shape_name, dtype_name, layout, p, *call) for call in sink]
    return launches


def _specialise(launch: Launch, arch: int):
    """(options, signature, constexprs, attrs) of the launch as Triton's JIT specialises it for the target."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    from timm_sadistill.ops import spatial_triton
    kernel = getattr(spatial_triton, launch.kernel)
    backend = make_backend(GPUTarget('cuda', arch, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    return kernel._pack_args(backend, launch.kwargs, bound, specialization, options)


def _ast_source(kernel, signature, constexprs, attrs):
    """`triton.compiler.ASTSource` under either name of its constants argument (``constexprs`` from triton 3.2)."""
    from triton.compiler import ASTSource
    name = 'constexprs' if 'constexprs' in inspect.signature(ASTSource.__init__).parameters else 'constants'
    return ASTSource(kernel, signature, **{name: constexprs}, attrs=attrs)


def _resource_usage(cubin: bytes) -> Tuple[int, int]:
    """(registers a thread, stack frame bytes: spills, these kernels having no local arrays) of a cubin."""
    import triton
    tool = Path(triton.__file__).parent / 'backends' / 'nvidia' / 'bin' / 'cuobjdump'
    with tempfile.NamedTemporaryFile(suffix='.cubin') as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), '--dump-resource-usage', f.name], capture_output=True, text=True,
                              check=True).stdout
    usage = dict(re.findall(r'\b(REG|STACK|LOCAL):(\d+)', text))
    return int(usage['REG']), int(usage['STACK']) + int(usage['LOCAL'])


def _compile_one(job) -> Dict[str, Any]:
    """Compile one specialisation (in a worker process); its registers, spills, shared memory, or the error."""
    kernel_name, arch, signature, constexprs, attrs, options = job
    import triton
    from triton.backends.compiler import GPUTarget
    from timm_sadistill.ops import spatial_triton
    begin = time.perf_counter()
    try:
        compiled = triton.compile(_ast_source(getattr(spatial_triton, kernel_name), signature, constexprs, attrs),
                                  target=GPUTarget('cuda', arch, 32), options=options)
        regs, spills = _resource_usage(compiled.asm['cubin'])
        shared = int(compiled.metadata.shared)
    except Exception as e:  # a failed compile is a finding: it goes in the report
        return dict(error=f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}',
                    seconds=time.perf_counter() - begin)
    return dict(regs=regs, spill_bytes=spills, shared_bytes=shared, seconds=time.perf_counter() - begin)


def _constexpr_names(kernel_name: str, constexprs) -> Dict[str, Any]:
    """The kernel's declared constexprs (the specialisation's flags and tile) by name, without the arguments the
    JIT made constant (a stride of 1, a None pointer)."""
    from timm_sadistill.ops import spatial_triton
    params = getattr(spatial_triton, kernel_name).params
    return {params[k[0]].name: v for k, v in constexprs.items() if params[k[0]].is_constexpr}


def run_report(archs: Sequence[int] = ARCHS, jobs: int = 2, **record_kwargs) -> List[Row]:
    """Record, specialise, dedupe and compile (in this process's pool; TRITON_INTERPRET must be unset)."""
    if os.environ.get('TRITON_INTERPRET', '0') == '1':
        raise RuntimeError('kernel_compile needs TRITON_INTERPRET unset; call compile_report() to run it apart.')
    launches = record_launches(**record_kwargs)
    rows: Dict[str, Row] = {}
    jobs_by_key: Dict[str, tuple] = {}
    for arch in archs:
        for launch in launches:
            options, signature, constexprs, attrs = _specialise(launch, arch)
            opts = options.__dict__
            key = repr((launch.kernel, arch, sorted(signature.items()), sorted(constexprs.items()),
                        sorted(attrs.items()), sorted(opts.items())))
            if key not in rows:
                rows[key] = Row(launch.kernel, arch, [], [], [], [], [], _constexpr_names(launch.kernel, constexprs),
                                opts['num_warps'], opts['num_stages'])
                jobs_by_key[key] = (launch.kernel, arch, signature, constexprs, attrs, opts)
            row = rows[key]
            for field, value in (('ops', launch.op), ('shapes', launch.shape), ('dtypes', launch.dtype),
                                 ('layouts', launch.layout), ('ps', launch.p)):
                if value not in getattr(row, field):
                    getattr(row, field).append(value)
    keys = list(jobs_by_key)
    with multiprocessing.get_context('fork').Pool(jobs) as pool:
        results = pool.map(_compile_one, [jobs_by_key[k] for k in keys], chunksize=1)
    for key, result in zip(keys, results):
        row = rows[key]
        for name, value in result.items():
            setattr(row, name, value)
        if row.error is None:
            row.blocks_per_sm, row.warps_per_sm = occupancy(row.regs, row.num_warps, row.shared_bytes, row.arch)
    return list(rows.values())


def compile_report(archs: Sequence[int] = ARCHS, jobs: int = 2, timeout: float = 1200,
                   shapes: Dict[str, Tuple[int, int, int]] = SHAPES, dtypes: Sequence[str] = DTYPES,
                   layouts: Sequence[str] = LAYOUTS, ps: Sequence[float] = PS) -> List[Row]:
    """`run_report` in a subprocess without TRITON_INTERPRET, so it works from a process running the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(ROOT), env.get('PYTHONPATH')]))
    matrix = dict(shapes=shapes, dtypes=list(dtypes), layouts=list(layouts), ps=list(ps))
    command = [sys.executable, '-m', 'benchmarks.kernel_compile', '--json', '--jobs', str(jobs),
               '--arch', *map(str, archs), '--matrix-json', json.dumps(matrix)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f'kernel_compile failed (exit {done.returncode}):\n{done.stderr[-4000:]}')
    return [Row(**row) for row in json.loads(done.stdout)]


def problems(rows: Sequence[Row], max_regs: int = MAX_REGS) -> List[str]:
    """One line per row that failed to compile, spills or takes more than ``max_regs`` registers a thread."""
    found = []
    for row in rows:
        where = (f"{row.kernel} sm_{row.arch} {row.constexprs} warps={row.num_warps} stages={row.num_stages} "
                 f"({', '.join(row.ops)}; {', '.join(row.shapes)}; {', '.join(row.dtypes)}; {', '.join(row.layouts)}; "
                 f"p={row.ps})")
        if row.error is not None:
            found.append(f'{where}: does not compile: {row.error}')
        elif row.spill_bytes:
            found.append(f'{where}: spills {row.spill_bytes} bytes')
        elif row.regs > max_regs:
            found.append(f'{where}: {row.regs} registers > {max_regs}')
    return found


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
    parser.add_argument('--json', action='store_true', help='print the rows as JSON (what compile_report reads)')
    parser.add_argument('--matrix-json', help=argparse.SUPPRESS)  # compile_report's shapes, dtypes, layouts, ps
    parser.add_argument('--out', help='also write the markdown table to this file')
    args = parser.parse_args(argv)
    args.arch = [_native_arch() if arch == 'native' else int(arch) for arch in args.arch]
    matrix = json.loads(args.matrix_json) if args.matrix_json else {}
    if 'shapes' in matrix:
        matrix['shapes'] = {k: tuple(v) for k, v in matrix['shapes'].items()}
    elif args.shapes:
        matrix['shapes'] = {name: SHAPES[name] for name in args.shapes}
    begin = time.perf_counter()
    if os.environ.get('TRITON_INTERPRET', '0') == '1':
        rows = compile_report(args.arch, args.jobs, **matrix)
    else:
        rows = run_report(args.arch, args.jobs, **matrix)
    if args.json:
        print(json.dumps([asdict(row) for row in rows]))
        return 0
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
