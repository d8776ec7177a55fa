"""Start-up cost of ``timm-sadistill train`` on a large folder: time to the first training step, against a plain
timm run on the same folder, measured in the same run.

    python benchmarks/startup.py --images 100000         # -> benchmarks/results/startup-cpu.md
    python benchmarks/startup.py --images 2000 --repeats 1 --output /tmp/startup.md   # a quick check

It writes an ImageFolder of ``--images`` tiny PNGs (one 8x8 PNG's bytes written to every file, so building the tree
costs file creation only) in ``--classes`` class folders under train/, and a tenth as many under validation/, plus
a second folder of a tenth of the size. On each folder it measures, from process launch to the end of the first
training step (forward, backward, optimizer step), two subprocesses:

* ``timm``: timm's own pipeline as its train.py builds it: ``create_model``, ``create_dataset`` of both splits,
  ``create_loader`` (prefetcher, ``-j`` workers), ``create_optimizer_v2``, one step;
* ``timm-sadistill``: ``python -m timm_sadistill train --distill none`` with the same model, sizes and loader
  flags and its default data checks; its first ``Train:`` log line (``--log-interval 1``) follows the first step.

Both read the same folder, whose listing is in the page cache for both after the first round. The runs alternate,
``--repeats`` rounds, and the median is reported. Each tool's time is fitted as ``a + b * images`` from the two
folder sizes, and the fit gives the 1M-image estimate (a linear model of the listing, checks and sort: what grows
with the data). The target is a ratio of at most 1.1 at ``--images``.
"""
import argparse
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the checkout's benchmarks/ helpers

from benchmarks.launch import write_report  # noqa: E402

TARGET = 1.1
FIRST_STEP = 'FIRST STEP DONE'  # the timm child prints this after its first step


def write_folder(root: str, images: int, classes: int) -> None:
    """train/ with ``images`` PNGs in ``classes`` folders, validation/ with a tenth as many."""
    import io

    import numpy as np
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buffer, format='PNG')
    png = buffer.getvalue()
    for split, count in (('train', images), ('validation', max(images // 10, classes))):
        for k in range(classes):
            folder = os.path.join(root, split, f'class{k:04d}')
            os.makedirs(folder)
            for i in range(k, count, classes):
                with open(os.path.join(folder, f'{i:07d}.png'), 'wb') as f:
                    f.write(png)


def timm_first_step(args: argparse.Namespace) -> None:
    """The ``timm`` child: timm's pipeline up to one training step, then the marker line."""
    import torch
    from timm.data import create_dataset, create_loader, resolve_data_config
    from timm.models import create_model
    from timm.optim import create_optimizer_v2

    model = create_model(args.model, num_classes=args.classes)
    data_config = resolve_data_config({'img_size': args.img_size}, model=model)
    loaders = []
    for split, is_training in (('train', True), ('validation', False)):
        dataset = create_dataset('', root=args.timm_child, split=split, is_training=is_training,
                                 batch_size=args.batch_size)
        loaders.append(create_loader(dataset, input_size=data_config['input_size'], batch_size=args.batch_size,
                                     is_training=is_training, mean=data_config['mean'], std=data_config['std'],
                                     num_workers=args.workers, device=torch.device('cpu')))
    optimizer = create_optimizer_v2(model, opt='sgd', lr=0.01)
    model.train()
    images, target = next(iter(loaders[0]))
    torch.nn.functional.cross_entropy(model(images), target).backward()
    optimizer.step()
    print(FIRST_STEP, flush=True)


def commands(args: argparse.Namespace, data: str, output: str) -> Dict[str, List[str]]:
    """The two commands timed on folder ``data``, by tool."""
    common = ['--model', args.model, '--img-size', str(args.img_size), '-b', str(args.batch_size),
              '-j', str(args.workers)]
    return {
        'timm': [sys.executable, os.path.abspath(__file__), '--timm-child', data,
                 '--classes', str(args.classes)] + common,
        'timm-sadistill': [sys.executable, '-m', 'timm_sadistill', 'train', '--data-dir', data, '--num-classes',
                           str(args.classes), '--distill', 'none', '--opt', 'sgd', '--lr', '0.01', '--epochs', '1',
                           '--log-interval', '1', '--output', output] + common,
    }


def time_to_first_step(command: List[str]) -> float:
    """Seconds from launch to the first-step line, then the process group we started is ended."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get('PYTHONPATH')])))
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               start_new_session=True)
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if line.startswith(FIRST_STEP) or line.startswith('Train: 0 ['):
                return time.perf_counter() - start
        raise RuntimeError(f"{shlex.join(command)} ended without a first step:\n{''.join(lines[-30:])}")
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--images', type=int, default=100_000, help='train images of the large folder')
    parser.add_argument('--classes', type=int, default=100)
    parser.add_argument('--repeats', type=int, default=3, help='rounds (each runs both tools on both folders)')
    parser.add_argument('--model', default='test_resnet')
    parser.add_argument('--img-size', type=int, default=32)
    parser.add_argument('-b', '--batch-size', type=int, default=32)
    parser.add_argument('-j', '--workers', type=int, default=2)
    parser.add_argument('--workdir', default=None, help='where the folders are written (default: a temp folder)')
    parser.add_argument('--output', default=os.path.join(ROOT, 'benchmarks', 'results', 'startup-cpu.md'))
    parser.add_argument('--timm-child', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.timm_child:
        return timm_first_step(args)

    workdir = tempfile.mkdtemp(prefix='tsd-startup-', dir=args.workdir)
    try:
        sizes = [args.images // 10, args.images]
        start = time.perf_counter()
        for n in sizes:
            write_folder(os.path.join(workdir, str(n)), n, args.classes)
        print(f'wrote {sum(sizes)} train images in {time.perf_counter() - start:.0f} s', flush=True)
        load_before = os.getloadavg()
        times: Dict[tuple, List[float]] = {}
        for round_ in range(args.repeats):
            for n in sizes:
                folders = os.path.join(workdir, str(n)), os.path.join(workdir, 'out')
                for tool, command in commands(args, *folders).items():
                    times.setdefault((tool, n), []).append(time_to_first_step(command))
                    print(f'round {round_}: {tool:>14} {n:>8} images: {times[tool, n][-1]:.2f} s', flush=True)
        load_after = os.getloadavg()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report(args, sizes, {k: statistics.median(v) for k, v in times.items()}, times, load_before, load_after)


def report(args: argparse.Namespace, sizes: List[int], median: Dict[tuple, float], times: Dict[tuple, List[float]],
           load_before: tuple, load_after: tuple) -> None:
    """The markdown report (``--output``): both folder sizes, the 1M fit and the target, with the machine's load."""
    import timm
    import torch
    fits = {}
    for tool in ('timm', 'timm-sadistill'):
        per_image = (median[tool, sizes[1]] - median[tool, sizes[0]]) / (sizes[1] - sizes[0])
        fits[tool] = (median[tool, sizes[1]] - per_image * sizes[1], per_image)
    ratio = median['timm-sadistill', sizes[1]] / median['timm', sizes[1]]
    at_1m = {tool: a + b * 1_000_000 for tool, (a, b) in fits.items()}
    command = shlex.join(['python', 'benchmarks/startup.py'] + sys.argv[1:])
    lines = [
        '# Start-up: time to the first training step (cpu)', '',
        f'`{args.model}`, {args.img_size} px, batch {args.batch_size}, `-j {args.workers}`, {args.classes} classes of '
        f'8x8 PNGs (validation: a tenth as many); torch {torch.__version__}, timm {timm.__version__}. From process '
        f'launch to the end of the first training step; median of {args.repeats} interleaved rounds. '
        f'`timm`: create_model, create_dataset + create_loader of both splits, one SGD step. `timm-sadistill`: '
        '`train --distill none` with its default data checks.', '',
        f'Reproduce: `{command}`', '',
        f'Machine: {os.cpu_count()} cores shared with other jobs; load average (1, 5, 15 min) '
        f'{", ".join(f"{x:.1f}" for x in load_before)} before and {", ".join(f"{x:.1f}" for x in load_after)} after '
        'the timed runs. The absolute times depend on that load; the ratio, measured in the same rounds, is what '
        'counts.', '',
        '| train images | timm (s) | timm-sadistill (s) | ratio | all rounds: timm / timm-sadistill (s) |',
        '|---:|---:|---:|---:|---|',
    ]
    for n in sizes:
        rounds = ', '.join(f'{a:.1f}/{b:.1f}' for a, b in zip(times['timm', n], times['timm-sadistill', n]))
        lines.append(f'| {n:,} | {median["timm", n]:.2f} | {median["timm-sadistill", n]:.2f} | '
                     f'{median["timm-sadistill", n] / median["timm", n]:.3f} | {rounds} |')
    lines.append(f'| 1,000,000 (fit a + b·n) | {at_1m["timm"]:.1f} | {at_1m["timm-sadistill"]:.1f} | '
                 f'{at_1m["timm-sadistill"] / at_1m["timm"]:.3f} | extrapolated |')
    lines += [
        '', 'Fit from the two sizes (a: fixed cost, b: cost per train image): ' + '; '.join(
            f'{tool} a = {a:.2f} s, b = {b * 1e6:.1f} µs' for tool, (a, b) in fits.items()) + '.', '',
        f'Target (ratio ≤ {TARGET} at {sizes[1]:,} images): {ratio:.3f} -> '
        f'**{"met" if ratio <= TARGET else "not met"}**',
    ]
    write_report(args.output, '\n'.join(lines) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
