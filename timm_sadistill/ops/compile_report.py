"""Compile every Triton launch the registered ops make, for a GPU target (sm_80, sm_90), on a machine without a GPU,
and report the registers, spills and occupancy of each.

Triton's compiler and the ptxas it ships build a kernel for any target without a device, so this checks what the
interpreter (the CPU tests) cannot: that each specialisation the ops launch compiles, and what it costs in
registers. The launches are recorded, not listed: each registered op (`op_registry`) runs its forward and a backward
of each nonempty subset of its outputs through the public op (``backend='triton'``), with the kernels its Triton
file registered swapped for recorders, on small CPU tensors of the real channel and position counts (the batch
size reaches the kernels only through the grid). Each recorded launch is specialised as Triton's JIT would
specialise it (its own binder: argument types, 16-divisibility, strides equal to 1), duplicates are compiled once,
and the registers and stack frame (spills) come from the compiled cubin (``cuobjdump --dump-resource-usage``).

Occupancy per SM, from the registers and the launch (warps a block, shared memory): blocks = min(32, 64 // warps,
65536 // (warps * 32 * regs rounded up to 8), shared memory / (shared + 1 KiB)), warps = blocks * warps a block.

The compile must not run under the interpreter: `compile_report` runs `run_report` in a subprocess without
TRITON_INTERPRET (``python -m timm_sadistill.ops.compile_report``, a JSON request on stdin, the rows as JSON on
stdout). `benchmarks/kernel_compile.py` is its command line.
"""
import contextlib
import inspect
import itertools
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

import torch

from . import dispatch, op_registry

__all__ = ['ARCHS', 'DTYPES', 'LAYOUTS', 'Launch', 'MAX_REGS', 'PS', 'Row', 'SHAPES', 'compile_report', 'kernels',
           'occupancy', 'problems', 'record_launches', 'run_report']

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
# the values of an op's argument p (a kernel's P_IS_TWO switch); an op without p runs at its defaults only
PS = (2.0, 1.5)
# shared memory an SM offers blocks (KiB): A100 / H100
SHARED_KIB = {80: 164, 90: 228}
# the checkout this module is in, for the compile's subprocess
_ROOT = Path(__file__).resolve().parents[2]


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


def kernels() -> Dict[str, str]:
    """Kernel name -> the module of every kernel the registered ops launch (the report names kernels, so a name is
    one kernel)."""
    found: Dict[str, str] = {}
    for op in op_registry.fused_ops().values():
        for name in op.kernels:
            if found.setdefault(name, op.module) != op.module:
                raise RuntimeError(f'two Triton files name a kernel {name}: {found[name]} and {op.module}; rename one.')
    return found


def _kernel(name: str):
    return getattr(sys.modules[kernels()[name]], name)


class _Recorder:
    """Stands in for a JIT kernel: ``kernel[grid](*args, **kwargs)`` records the call instead of launching."""

    def __init__(self, name: str, sink: List[Tuple[str, tuple, dict]]):
        self.name, self.sink = name, sink

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.sink.append((self.name, args, kwargs))


@contextlib.contextmanager
def _recording(sink: List[Tuple[str, tuple, dict]]) -> Iterator[None]:
    """The registered kernels swapped for recorders, and the public ops' Triton path open to CPU tensors (as under
    the interpreter: the dispatcher and the custom ops read TRITON_INTERPRET per call), so nothing launches."""
    saved = {name: _kernel(name) for name in kernels()}
    interpret = os.environ.get('TRITON_INTERPRET')
    try:
        os.environ['TRITON_INTERPRET'] = '1'
        for name, module in kernels().items():
            setattr(sys.modules[module], name, _Recorder(name, sink))
        yield
    finally:
        for name, kernel in saved.items():
            setattr(sys.modules[kernels()[name]], name, kernel)
        if interpret is None:
            del os.environ['TRITON_INTERPRET']
        else:
            os.environ['TRITON_INTERPRET'] = interpret


def _run_forward_and_backwards(op, args: tuple) -> None:
    """The op's forward, then a backward of each nonempty subset of its outputs (a custom op skips the work of an
    output that takes no gradient), largest first."""
    outputs = op(*args, backend='triton')
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    for size in range(len(outputs), 0, -1):
        for subset in itertools.combinations(outputs, size):
            torch.autograd.grad(sum(o.sum() for o in subset), args[0], retain_graph=True)


def record_launches(shapes: Dict[str, Tuple[int, int, int]] = SHAPES, dtypes: Sequence[str] = DTYPES,
                    layouts: Sequence[str] = LAYOUTS, ps: Sequence[float] = PS, batch: int = 1) -> List[Launch]:
    """Every kernel launch of every registered op (forward and its backward cases) at each shape, dtype, layout, p."""
    public, specs = dispatch.public_ops(), dispatch.op_specs()
    launches = []
    for (shape_name, (c, h, w)), dtype_name, layout in itertools.product(shapes.items(), dtypes, layouts):
        memory_format = torch.channels_last if layout == 'channels_last' else torch.contiguous_format
        s = torch.empty(batch, c, h, w, dtype=getattr(torch, dtype_name), memory_format=memory_format)
        t = torch.empty_like(s)
        for p, name in itertools.product(ps, sorted(op_registry.fused_ops())):
            spec = specs[name]
            if 'p' not in spec.names and p != ps[0]:
                continue  # p reaches only the ops that take it
            scalars = {'p': p} if 'p' in spec.names else {}
            args = dispatch.example_args(spec, [s.requires_grad_()] + [t] * (len(spec.tensors) - 1), **scalars)
            sink: List[Tuple[str, tuple, dict]] = []
            with _recording(sink):
                _run_forward_and_backwards(public[name], args)
            launches += [Launch(name, shape_name, dtype_name, layout, p, *call) for call in sink]
    return launches


def _specialise(launch: Launch, arch: int):
    """(options, signature, constexprs, attrs) of the launch as Triton's JIT specialises it for the target."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    kernel = _kernel(launch.kernel)
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
    begin = time.perf_counter()
    try:
        compiled = triton.compile(_ast_source(_kernel(kernel_name), signature, constexprs, attrs),
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
    params = _kernel(kernel_name).params
    return {params[k[0]].name: v for k, v in constexprs.items() if params[k[0]].is_constexpr}


def _deduplicate(launches: Sequence[Launch], archs: Sequence[int]) -> Tuple[Dict[str, Row], Dict[str, tuple]]:
    """One row (and compile job) per distinct specialisation and target, naming every launch that needs it."""
    rows: Dict[str, Row] = {}
    jobs: Dict[str, tuple] = {}
    for arch, launch in itertools.product(archs, launches):
        options, signature, constexprs, attrs = _specialise(launch, arch)
        opts = options.__dict__
        key = repr((launch.kernel, arch, sorted(signature.items()), sorted(constexprs.items()),
                    sorted(attrs.items()), sorted(opts.items())))
        if key not in rows:
            rows[key] = Row(launch.kernel, arch, [], [], [], [], [], _constexpr_names(launch.kernel, constexprs),
                            opts['num_warps'], opts['num_stages'])
            jobs[key] = (launch.kernel, arch, signature, constexprs, attrs, opts)
        row = rows[key]
        for field, value in (('ops', launch.op), ('shapes', launch.shape), ('dtypes', launch.dtype),
                             ('layouts', launch.layout), ('ps', launch.p)):
            if value not in getattr(row, field):
                getattr(row, field).append(value)
    return rows, jobs


def run_report(archs: Sequence[int] = ARCHS, jobs: int = 2, **record_kwargs) -> List[Row]:
    """Record, specialise, dedupe and compile (in this process's pool; TRITON_INTERPRET must be unset)."""
    if os.environ.get('TRITON_INTERPRET', '0') == '1':
        raise RuntimeError('the compile report needs TRITON_INTERPRET unset; call compile_report() to run it apart.')
    rows, compile_jobs = _deduplicate(record_launches(**record_kwargs), archs)
    keys = list(compile_jobs)
    with multiprocessing.get_context('fork').Pool(jobs) as pool:
        results = pool.map(_compile_one, [compile_jobs[k] for k in keys], chunksize=1)
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
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(_ROOT), env.get('PYTHONPATH')]))
    request = dict(archs=list(archs), jobs=jobs, shapes=shapes, dtypes=list(dtypes), layouts=list(layouts),
                   ps=list(ps))
    done = subprocess.run([sys.executable, '-m', __name__], input=json.dumps(request), cwd=_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f'the compile report failed (exit {done.returncode}):\n{done.stderr[-4000:]}')
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


def _serve() -> None:
    """`compile_report`'s subprocess: the request (JSON on stdin) in, the rows (JSON on stdout) out."""
    request = json.load(sys.stdin)
    request['shapes'] = {name: tuple(chw) for name, chw in request['shapes'].items()}
    print(json.dumps([asdict(row) for row in run_report(**request)]))


if __name__ == '__main__':
    _serve()
