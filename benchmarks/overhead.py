"""Training-step time and memory of every distillation method, relative to plain student training and to KD.

    python benchmarks/overhead.py                      # CPU -> benchmarks/results/overhead-cpu.md
    python benchmarks/overhead.py --device cuda        # GPU -> benchmarks/results/overhead-cuda.md

A step is what ``timm-sadistill train`` does per batch: the task's forward (frozen teacher, student, loss), backward
and an AdamW step; ``none`` is timm's ClassificationTask, as ``--distill none`` trains. Times: every method runs
``--steps`` steps in turn, and the rounds repeat ``--repeats`` times (interleaved, so a change in the machine's
load hits every method alike); the median over rounds of the mean step time is reported, with ratios measured in
the same process.

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` over the steps minus the memory allocated before them. On
the CPU, torch has no allocator counter, so each method runs in a fresh subprocess and the process's peak resident
set size over the steps (VmHWM, reset after the models are built) minus its resident set before them is reported:
a coarse number (it counts the allocator's caching and the optimizer state), labelled as such.
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple, Union

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout without an install

import timm  # noqa: E402
from timm.task import ClassificationTask  # noqa: E402

import timm_sadistill as tsd  # noqa: E402

METHODS = ('none', 'kd', 'at', 'fitnet', 'cwd', 'dkd', 'sa')


def parse_method(spec: str) -> Tuple[str, Dict[str, Union[float, str]]]:
    """'sa' -> ('sa', {}); 'sa[connector=conv1x1,beta=30]' -> ('sa', {'connector': 'conv1x1', 'beta': 30.0})."""
    name, _, rest = spec.partition('[')
    options: Dict[str, Union[float, str]] = {}
    for item in filter(None, rest.rstrip(']').split(',')):
        key, _, value = item.partition('=')
        try:
            options[key] = float(value)
        except ValueError:
            options[key] = value
    return name, options


def build(method: str, teacher: str, student: str, num_classes: int, img_size: int, device: torch.device):
    """(task, optimizer) as the CLI builds them (teacher with random weights: the cost does not depend on them).

    ``method`` is a registered name, optionally with task options (see `parse_method`), or 'none'.
    """
    torch.manual_seed(0)
    model = timm.create_model(student, num_classes=num_classes).to(device)
    name, options = parse_method(method)
    if name == 'none':
        task = ClassificationTask(model, criterion=torch.nn.CrossEntropyLoss(), device=device, verbose=False)
    else:
        teacher_model = timm.create_model(teacher, num_classes=num_classes)
        task = tsd.create_distill_task(name, model, teacher_model, img_size=img_size, device=device, verbose=False,
                                       **options)
    task.to(device)
    task.train()
    optimizer = torch.optim.AdamW(task.get_trainable_module().parameters(), lr=1e-3)
    return task, optimizer


def step(task, optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    loss = task(x, y)['loss']
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_methods(args: argparse.Namespace, device: torch.device) -> Dict[str, List[float]]:
    """Mean seconds per step of each method, one value per interleaved round."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g).to(device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=g).to(device)
    built = {m: build(m, args.teacher, args.student, args.num_classes, args.img_size, device) for m in args.methods}
    for task, optimizer in built.values():  # warm-up: first-call allocations and kernel selection
        for _ in range(args.warmup):
            step(task, optimizer, x, y)
    times: Dict[str, List[float]] = {m: [] for m in args.methods}
    for _ in range(args.repeats):
        for method, (task, optimizer) in built.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                step(task, optimizer, x, y)
            sync(device)
            times[method].append((time.perf_counter() - start) / args.steps)
    return times


def memory_of(method: str, args: argparse.Namespace, device: torch.device) -> float:
    """MiB: peak allocated (CUDA) or peak-RSS increase (CPU, in this process) over ``args.steps`` steps."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g).to(device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=g).to(device)
    task, optimizer = build(method, args.teacher, args.student, args.num_classes, args.img_size, device)
    if device.type == 'cuda':
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        # building the models raised the peak already: reset it (Linux: clear_refs 5 resets VmHWM) and start from
        # the resident set now
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        base = _status_kib('VmRSS')
    for _ in range(args.steps):
        step(task, optimizer, x, y)
    if device.type == 'cuda':
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    return (_status_kib('VmHWM') - base) / 2 ** 10


def _status_kib(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident), in KiB."""
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise RuntimeError(f'/proc/self/status has no {field}: the CPU memory measurement needs Linux.')


def memory_methods(args: argparse.Namespace, argv: List[str]) -> Dict[str, float]:
    """Each method's memory in a fresh subprocess, so one method's peak never hides another's (CPU RSS)."""
    result = {}
    for method in args.methods:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, '--memory-of', method],
                             capture_output=True, text=True, check=True)
        result[method] = json.loads(out.stdout.strip().splitlines()[-1])['mib']
    return result


def report(args: argparse.Namespace, device: torch.device, times: Dict[str, List[float]],
           memory: Dict[str, float], command: str) -> str:
    median = {m: statistics.median(t) for m, t in times.items()}
    memory_label = ('peak allocated over the steps (MiB)' if device.type == 'cuda'
                    else 'peak RSS increase over the steps (MiB, coarse)')
    lines = [f'# Training-step overhead ({device.type})', '',
             f'`{args.teacher}` -> `{args.student}`, batch {args.batch_size}, {args.img_size} px, '
             f'{torch.get_num_threads()} torch thread(s), torch {torch.__version__}, timm {timm.__version__}. '
             f'Median over {args.repeats} interleaved rounds of {args.steps} steps '
             f'(after {args.warmup} warm-up steps). '
             'A step: forward (teacher, student, loss), backward, AdamW.', '',
             f'Reproduce: `{command}`', '',
             f'| method | ms / step | × none | × kd | {memory_label} |', '|---|---|---|---|---|']
    for method in args.methods:
        none = f'{median[method] / median["none"]:.2f}' if 'none' in median else ''
        kd = f'{median[method] / median["kd"]:.2f}' if 'kd' in median else ''
        mib = memory.get(method, float('nan'))
        lines.append(f'| {method} | {1000 * median[method]:.1f} | {none} | {kd} | {mib:.0f} |')
    if 'sa' in median and 'kd' in median:
        ratio = median['sa'] / median['kd']
        verdict = 'met' if ratio <= 1.15 else 'not met'
        lines += ['', f'Target (SA step ≤ 1.15 × KD step): {ratio:.2f} × -> **{verdict}**']
    return '\n'.join(lines) + '\n'


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
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--threads', type=int, default=1, help='torch threads (CPU)')
    parser.add_argument('--results', default=os.path.join(ROOT, 'benchmarks', 'results'))
    parser.add_argument('--memory-of', default=None, help=argparse.SUPPRESS)  # internal: one method's memory
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.memory_of:
        print(json.dumps({'mib': memory_of(args.memory_of, args, device)}))
        return 0
    times = time_methods(args, device)
    if device.type == 'cuda':
        memory = {m: memory_of(m, args, device) for m in args.methods}
    else:
        memory = memory_methods(args, argv)
    text = report(args, device, times, memory, shlex.join(['python', 'benchmarks/overhead.py', *argv]))
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, f'overhead-{device.type}.md'), 'w') as f:
        f.write(text)
    print(text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
