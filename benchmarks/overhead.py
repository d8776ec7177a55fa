"""Training-step time, memory and FLOPs of every distillation method, relative to plain student training and to KD.

    python benchmarks/overhead.py                      # CPU -> benchmarks/results/overhead-cpu.md
    python benchmarks/overhead.py --device cuda --teacher resnet50 --student resnet18 --img-size 224 \
        --num-classes 1000 --batch-size 128 --amp --channels-last --compile both \
        --methods 'none;kd;sa[backend=triton];sa[backend=torch]' --no-flops   # GPU (what gpu_check.sh runs)

A step is what ``timm-sadistill train`` does per batch: the task's forward (frozen teacher, student, loss), backward
and an AdamW step; ``none`` is timm's ClassificationTask, as ``--distill none`` trains. Times: every method runs
``--steps`` steps in turn, and the rounds repeat ``--repeats`` times (interleaved, so a change in the machine's
load hits every method alike); the median over rounds of the mean step time is reported, with ratios measured in
the same process. ``--clock process`` times the CPU time of this process instead of the wall clock: on a CPU shared
with other jobs, where the share of the cores a row gets changes from second to second, it counts the work each
step does (with ``--threads 1``, whose one thread never waits for another).

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` during one steady-state step minus the memory allocated
before it (activations, gradients, temporaries; not the weights or the optimizer state). On the CPU, torch has no allocator counter, so each method runs in a fresh subprocess and the process's peak resident
set size over the steps (VmHWM, reset after the models are built) minus its resident set before them is reported:
a coarse number (it counts the allocator's caching and the optimizer state), labelled as such.

``--amp`` runs the forward under bfloat16 autocast (no loss scaler needed); ``--channels-last`` puts the student and
the input in channels-last, as ``timm-sadistill train --channels-last`` does (the teacher and the connectors keep
their layout); ``--compile on`` compiles each task with ``task.compile()`` as ``--torchcompile`` does (compilation
happens in the warm-up steps), ``both`` times every method eager, writes the report, then times every method
compiled and rewrites it: rounds interleave within a group, so the ratios within a group compare like with like,
and a run stopped while compiling keeps its eager table. ``--report-each-compiled-row`` times each compiled row
right after its warm-up instead and rewrites the report after each (for a time-limited GPU run, where a cold
compile of each row takes tens of seconds: the rows finished are kept; a dedicated GPU needs the interleaving less).

FLOPs (a separate table, ``--flops-pair teacher,student,img_size``, default resnet50,resnet18,224 at 1000 classes):
one training step's forward (frozen teacher, student, loss) and backward under
``torch.utils.flop_counter.FlopCounterMode`` on ``--flops-images`` random images on the CPU in float32 (counts
depend only on the shapes, not on the device or dtype), reported in GMACs per image (FlopCounterMode counts
2 FLOPs per multiply-accumulate). It counts matmuls and convolutions only: elementwise work (activations,
normalisation, softmaxes, the SA/KD/AT loss terms, the optimizer step) is not in the count. The connectors'
parameter count and their forward GMACs per image are reported beside it.
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Dict, List, Optional, Tuple

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout without an install

import timm  # noqa: E402
from timm.task import ClassificationTask  # noqa: E402

import timm_sadistill as tsd  # noqa: E402
from timm_sadistill.losses.connectors import ConnectorList  # noqa: E402

METHODS = ('none', *tsd.list_distill_losses())  # every registered loss; 'none' trains the student alone
COMPILED = ' +compile'  # suffix of a compiled method's row label


def build(method: str, teacher: str, student: str, num_classes: int, img_size: int, device: torch.device,
          channels_last: bool = False, compile: bool = False):
    """(task, optimizer) as the CLI builds them (teacher with random weights: the cost does not depend on them).

    ``method`` is a registered name, optionally with options (``tsd.parse_loss_spec``), or 'none'.
    ``channels_last`` converts the student only and ``compile`` calls ``task.compile()``, as the CLI's
    ``--channels-last`` and ``--torchcompile`` do.
    """
    torch.manual_seed(0)
    model = timm.create_model(student, num_classes=num_classes).to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    name, options = tsd.parse_loss_spec(method)
    if name == 'none':
        task = ClassificationTask(model, criterion=torch.nn.CrossEntropyLoss(), device=device, verbose=False)
    else:
        teacher_model = timm.create_model(teacher, num_classes=num_classes)
        task = tsd.create_distill_task(name, model, teacher_model, img_size=img_size, device=device, verbose=False,
                                       **options)
    task.to(device)
    task.train()
    optimizer = torch.optim.AdamW(task.get_trainable_module().parameters(), lr=1e-3)
    if compile:
        task.compile()
    return task, optimizer


def autocast_of(args: argparse.Namespace, device: torch.device) -> Callable[[], ContextManager]:
    """The forward's context: bfloat16 autocast with ``--amp``, nothing otherwise."""
    if args.amp:
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext


def batch(args: argparse.Namespace, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """The fixed random (images, labels) every method is timed on, channels-last with ``--channels-last``."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g).to(device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=g).to(device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def step(task, optimizer, x: torch.Tensor, y: torch.Tensor,
         autocast: Callable[[], ContextManager] = nullcontext) -> Dict[str, torch.Tensor]:
    """One training step; returns the task's loss and terms, detached (no device sync: timing stays honest)."""
    with autocast():
        result = task(x, y)
    optimizer.zero_grad(set_to_none=True)
    result['loss'].backward()
    optimizer.step()
    return {name: value.detach() for name, value in result.items() if name != 'output'}


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def compile_modes(args: argparse.Namespace) -> List[bool]:
    """The groups of rows ``--compile`` asks for: eager, compiled, or eager then compiled."""
    return {'off': [False], 'on': [True], 'both': [False, True]}[args.compile]


def variants(args: argparse.Namespace, modes: Optional[List[bool]] = None) -> List[Tuple[str, str, bool]]:
    """(row label, method spec, compiled) of every row of the given compile ``modes`` (default: all asked for)."""
    modes = compile_modes(args) if modes is None else modes
    return [(method + (COMPILED if compiled else ''), method, compiled) for compiled in modes for method in args.methods]


def time_methods(args: argparse.Namespace, device: torch.device,
                 rows: List[Tuple[str, str, bool]]) -> Tuple[Dict[str, List[float]], Dict[str, float]]:
    """(mean seconds per step of each of ``rows``, one value per interleaved round; CUDA memory of each in MiB).

    CUDA memory is a steady-state step's peak allocated over what was allocated before it: activations, gradients
    (zeroed to None every step) and temporaries, not the weights or the optimizer state. Every row's models stay
    built through the rounds, so the memory before a step also holds the other rows' models: it cancels out.
    """
    x, y = batch(args, device)
    autocast = autocast_of(args, device)
    clock = time.process_time if args.clock == 'process' else time.perf_counter
    built = {}
    for label, method, compiled in rows:  # warm-up: first-call allocations, kernel selection, compiling
        start = time.perf_counter()
        try:
            task, optimizer = build(method, args.teacher, args.student, args.num_classes, args.img_size, device,
                                    channels_last=args.channels_last, compile=compiled)
            for _ in range(args.warmup):
                step(task, optimizer, x, y, autocast)
            sync(device)
        except Exception:  # noqa: BLE001 - one row that fails (a compile error, say) must not cost the others
            traceback.print_exc()
            print(f'{label}: FAILED, left out of the timings', file=sys.stderr, flush=True)
            continue
        built[label] = task, optimizer
        print(f'{label}: built and warmed up in {time.perf_counter() - start:.1f} s', file=sys.stderr, flush=True)
    times: Dict[str, List[float]] = {label: [] for label in built}
    for _ in range(args.repeats):
        for label, (task, optimizer) in built.items():
            sync(device)
            start = clock()
            for _ in range(args.steps):
                step(task, optimizer, x, y, autocast)
            sync(device)
            times[label].append((clock() - start) / args.steps)
    memory: Dict[str, float] = {}
    if device.type == 'cuda':
        for label, (task, optimizer) in built.items():
            sync(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            step(task, optimizer, x, y, autocast)
            sync(device)
            memory[label] = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    return times, memory


def memory_of(label: str, args: argparse.Namespace, device: torch.device) -> float:
    """MiB, CPU: the peak-RSS increase of this process over ``args.steps`` steps of one row (see the module doc)."""
    x, y = batch(args, device)
    method = label[:-len(COMPILED)] if label.endswith(COMPILED) else label
    task, optimizer = build(method, args.teacher, args.student, args.num_classes, args.img_size, device,
                            channels_last=args.channels_last, compile=label.endswith(COMPILED))
    # building the models raised the peak already: reset it (Linux: clear_refs 5 resets VmHWM) and start from
    # the resident set now
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')
    base = _status_kib('VmRSS')
    for _ in range(args.steps):
        step(task, optimizer, x, y, autocast_of(args, device))
    return (_status_kib('VmHWM') - base) / 2 ** 10


def _status_kib(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident), in KiB."""
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise RuntimeError(f'/proc/self/status has no {field}: the CPU memory measurement needs Linux.')


def memory_methods(args: argparse.Namespace, argv: List[str], times: Dict[str, List[float]]) -> Dict[str, float]:
    """Each timed row's memory in a fresh subprocess, so one row's peak never hides another's (CPU RSS)."""
    result = {}
    for label, _, _ in variants(args):
        if label not in times:
            continue  # another group's row, or one that failed
        out = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, '--no-flops', '--memory-of', label],
                             capture_output=True, text=True, check=True)
        result[label] = json.loads(out.stdout.strip().splitlines()[-1])['mib']
    return result


# ----------------------------------------------------------------------------------------------------------------
# FLOPs


@dataclass
class StepFlops:
    """What FlopCounterMode counts (matmuls and convolutions, 2 FLOPs per MAC) for one task, in FLOPs per image."""
    step: float  # one training step: forward (teacher, student, loss) and backward
    connector_params: int  # trainable parameters of the loss (its connectors), per task, not per image
    connector_forward: float  # the connectors' forward alone


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs FlopCounterMode counts while ``fn()`` runs (matmuls and convolutions only)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def step_flops(task, x: torch.Tensor, y: torch.Tensor) -> StepFlops:
    """One training step's FLOPs per image, and the loss's connectors' parameters and forward FLOPs per image.

    The step is ``task(x, y)['loss'].backward()``: the frozen teacher's forward (no backward), the student's
    forward and backward, the loss and its connectors forward and backward; the optimizer step is elementwise and
    would count 0. The connectors' forward is counted on their own: forward pre-hooks record each connector's
    input during the step, and the connectors run again on those inputs under the counter.
    """
    loss = task.distill_loss if isinstance(task, tsd.DistillTask) else None
    connectors = [c for m in (loss.modules() if loss is not None else ()) if isinstance(m, ConnectorList) for c in m]
    inputs: List[Tuple[torch.nn.Module, tuple]] = []
    hooks = [c.register_forward_pre_hook(lambda module, args: inputs.append((module, args))) for c in connectors]
    try:
        step_count = count_flops(lambda: task(x, y)['loss'].backward())
    finally:
        for hook in hooks:
            hook.remove()
    with torch.no_grad():
        connector_count = count_flops(lambda: [module(*args) for module, args in inputs])
    params = sum(p.numel() for p in loss.parameters()) if loss is not None else 0
    images = x.shape[0]
    return StepFlops(step_count / images, params, connector_count / images)


def flops_methods(methods: List[str], teacher: str, student: str, img_size: int, num_classes: int = 1000,
                  images: int = 2) -> Tuple[Dict[str, StepFlops], Dict[str, float]]:
    """Each method's `StepFlops` on ``images`` random CPU images, plus the bare models' forward FLOPs per image
    and parameters (``{'teacher_forward', 'teacher_params', 'student_forward', 'student_params'}``) to check the
    counts against."""
    cpu = torch.device('cpu')
    g = torch.Generator().manual_seed(0)
    x = torch.randn(images, 3, img_size, img_size, generator=g)
    y = torch.randint(0, num_classes, (images,), generator=g)
    result = {}
    for method in methods:
        task, _ = build(method, teacher, student, num_classes, img_size, cpu)
        result[method] = step_flops(task, x, y)
    models = {}
    for role, name in (('teacher', teacher), ('student', student)):
        model = timm.create_model(name, num_classes=num_classes).eval()
        with torch.no_grad():
            models[f'{role}_forward'] = count_flops(lambda: model(x)) / images
        models[f'{role}_params'] = sum(p.numel() for p in model.parameters())
    return result, models


def flops_report(flops: Dict[str, StepFlops], models: Dict[str, float], teacher: str, student: str,
                 img_size: int, num_classes: int = 1000) -> List[str]:
    """The FLOP table's markdown lines."""
    def gmacs(value: float) -> str:
        return f'{value / 2e9:.2f}'

    lines = [f'## FLOPs of a training step: `{teacher}` -> `{student}`, {img_size} px, {num_classes} classes', '',
             'GMACs per image (1 MAC = 2 FLOPs; `torch.utils.flop_counter.FlopCounterMode` on the CPU, float32; the '
             'counts depend only on the shapes). A step is the forward (frozen teacher, student, loss) and the '
             'backward; the teacher has no backward. **Only matmuls and convolutions are counted**: elementwise work '
             '(activations, BatchNorm, softmaxes, the SA/KD/AT/CWD loss terms themselves, which run through '
             "`tsd.ops` with backend 'auto' = the torch reference on the CPU, and the optimizer step) is not.", '',
             f"Bare models, forward: `{teacher}` {gmacs(models['teacher_forward'])} GMACs, "
             f"{models['teacher_params'] / 1e6:.1f} M parameters; `{student}` {gmacs(models['student_forward'])} "
             f"GMACs, {models['student_params'] / 1e6:.1f} M parameters.", '',
             '| method | step GMACs / image | × none | × kd | connector parameters (M) | connector forward GMACs / image |',
             '|---|---:|---:|---:|---:|---:|']
    for method, f in flops.items():
        none = f'{f.step / flops["none"].step:.2f}' if 'none' in flops else ''
        kd = f'{f.step / flops["kd"].step:.2f}' if 'kd' in flops else ''
        lines.append(f'| {method} | {gmacs(f.step)} | {none} | {kd} | {f.connector_params / 1e6:.2f} | '
                     f'{gmacs(f.connector_forward)} |')
    return lines


# ----------------------------------------------------------------------------------------------------------------
# Report


def report(args: argparse.Namespace, device: torch.device, times: Dict[str, List[float]],
           memory: Dict[str, float], command: str, flops_lines: Optional[List[str]] = None) -> str:
    median = {m: statistics.median(t) for m, t in times.items()}
    memory_label = ('peak allocated in a step over what was allocated before it (MiB)' if device.type == 'cuda'
                    else 'peak RSS increase over the steps (MiB, coarse)')
    setting = ', '.join(filter(None, [
        'bf16 autocast' if args.amp else 'fp32', 'channels-last student and input' if args.channels_last else '',
        {'off': '', 'on': 'torch.compile', 'both': 'eager and torch.compile'}[args.compile]]))
    where = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} torch thread(s)'
    lines = [f'# Training-step overhead ({device.type})', '',
             f'`{args.teacher}` -> `{args.student}`, batch {args.batch_size}, {args.img_size} px, '
             f'{args.num_classes} classes, {setting}; {where}, torch {torch.__version__}, timm {timm.__version__}. '
             f'Median over {args.repeats} interleaved rounds of {args.steps} steps '
             f'(after {args.warmup} warm-up steps)'
             + (', CPU time of the process' if args.clock == 'process' else '') + '. '
             'A step: forward (teacher, student, loss), backward, AdamW.', '',
             f'Reproduce: `{command}`', '',
             f'| method | ms / step | × none | × kd | {memory_label} |', '|---|---|---|---|---|']
    for label, _, compiled in variants(args):
        if label not in median:
            lines.append(f'| {label} | failed or not run (see the log) | | | |')
            continue
        suffix = COMPILED if compiled else ''
        none = f'{median[label] / median["none" + suffix]:.2f}' if 'none' + suffix in median else ''
        kd = f'{median[label] / median["kd" + suffix]:.2f}' if 'kd' + suffix in median else ''
        mib = memory.get(label, float('nan'))
        lines.append(f'| {label} | {1000 * median[label]:.1f} | {none} | {kd} | {mib:.0f} |')
    # the GPU target counts on the fused Triton kernels; the CPU runs the PyTorch reference: the earlier, looser one
    target = 1.05 if device.type == 'cuda' else 1.15
    verdicts = []
    for label, method, compiled in variants(args):
        kd = 'kd' + (COMPILED if compiled else '')
        if tsd.parse_loss_spec(method)[0] == 'sa' and kd in median and label in median:
            ratio = median[label] / median[kd]
            verdicts.append(f'- {label}: {ratio:.2f} × -> **{"met" if ratio <= target else "not met"}**')
    if verdicts:
        lines += ['', f'Target (SA step ≤ {target} × KD step):', '', *verdicts]
    if flops_lines:
        lines += ['', *flops_lines]
    return '\n'.join(lines) + '\n'


def parse_pair(text: str) -> Tuple[str, str, int]:
    """'resnet50,resnet18,224' -> ('resnet50', 'resnet18', 224)."""
    teacher, student, img_size = text.split(',')
    return teacher, student, int(img_size)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--teacher', default='resnet18')
    parser.add_argument('--student', default='test_resnet')
    parser.add_argument('--num-classes', type=int, default=10)
    parser.add_argument('--img-size', type=int, default=64)
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--methods', type=lambda s: s.split(';'), default=list(METHODS),
                        help="';'-separated methods, each optionally with options: 'kd;sa;sa[connector=conv1x1]'")
    parser.add_argument('--steps', type=int, default=5, help='steps per round')
    parser.add_argument('--repeats', type=int, default=7, help='interleaved rounds')
    parser.add_argument('--warmup', type=int, default=2, help='warm-up steps per row (compiling happens in them)')
    parser.add_argument('--threads', type=int, default=1, help='torch threads (CPU)')
    parser.add_argument('--clock', choices=['wall', 'process'], default='wall',
                        help="'process': this process's CPU time, for a CPU shared with other jobs (see above)")
    parser.add_argument('--amp', action='store_true', help='bfloat16 autocast for the forward')
    parser.add_argument('--channels-last', action='store_true', help='channels-last student and input (as the CLI)')
    parser.add_argument('--compile', choices=['off', 'on', 'both'], default='off',
                        help="task.compile() every method ('on'), or time each eager and compiled ('both')")
    parser.add_argument('--report-each-compiled-row', action='store_true',
                        help='time each compiled row right after its warm-up and rewrite the report after each, so '
                             'a time-limited run keeps the rows it finished (their rounds do not interleave)')
    parser.add_argument('--flops-pair', type=parse_pair, default=('resnet50', 'resnet18', 224),
                        metavar='TEACHER,STUDENT,IMG_SIZE', help='pair of the FLOP table (default resnet50,resnet18,224)')
    parser.add_argument('--flops-images', type=int, default=2, help='images the FLOPs are counted on (per image reported)')
    parser.add_argument('--no-flops', action='store_true', help='skip the FLOP table')
    parser.add_argument('--results', default=os.path.join(ROOT, 'benchmarks', 'results'))
    parser.add_argument('--out', default=None, help='report file (default <results>/overhead-<device type>.md)')
    parser.add_argument('--memory-of', default=None, help=argparse.SUPPRESS)  # internal: one row's memory
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.memory_of:
        print(json.dumps({'mib': memory_of(args.memory_of, args, device)}))
        return 0
    flops_lines = None
    if not args.no_flops:
        teacher, student, img_size = args.flops_pair
        flops, models = flops_methods(args.methods, teacher, student, img_size, images=args.flops_images)
        flops_lines = flops_report(flops, models, teacher, student, img_size)
        print('\n'.join(flops_lines), flush=True)
    out = args.out or os.path.join(args.results, f'overhead-{device.type}.md')
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    times: Dict[str, List[float]] = {}
    memory: Dict[str, float] = {}
    # eager rows first, reported before compiling starts: a run stopped while compiling keeps the eager table
    for compiled in compile_modes(args):
        rows = variants(args, [compiled])
        for group in ([[row] for row in rows] if compiled and args.report_each_compiled_row else [rows]):
            group_times, group_memory = time_methods(args, device, group)
            times.update(group_times)
            memory.update(group_memory if device.type == 'cuda' else memory_methods(args, argv, group_times))
            text = report(args, device, times, memory, shlex.join(['python', 'benchmarks/overhead.py', *argv]),
                          flops_lines)
            with open(out, 'w') as f:
                f.write(text)
    print(text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
