"""Accuracy of every distillation method on data-starved students, through the real ``timm-sadistill train``.

Superseded by ``benchmarks/sa_search.py``, which separates the methods (this benchmark's KD gain was narrower than
its seed noise); its results stay in ``benchmarks/results/superseded/`` (benchmarks/README.md).

Protocol (docs/method.md#measuring-it-data-starved-students): each teacher trains once on the full train split of a
dataset (seed 0, cached); each student trains on ``--per-class`` images a class of the same split, at 64 px, with
one schedule for every method, on the same seeds, and is scored by its validation top-1 after the last epoch (no
selection on the validation split). Methods run with their defaults (``--distill sa`` with no SA flags is
``create_distill_task('sa', ...)``'s defaults). Every run is cached as a json per (dataset, pair, method, seed)
under ``--cache``, so an interrupted benchmark resumes where it stopped.

    python benchmarks/accuracy.py                    # main table -> benchmarks/results/superseded/accuracy.{md,csv,png}
    python benchmarks/accuracy.py --mode ablation    # SA/KD ablation -> benchmarks/results/superseded/ablation.{md,csv}
    python benchmarks/accuracy.py --seeds 0 --epochs 1 --methods none,sa --datasets lfw --pairs homo \\
        --cache /tmp/c --results /tmp/r               # a smoke run (what tests/training/test_datasets.py does)

Ablation: the SA variants (each term alone, the logit term off, tau, p, connector, stages) and KD variants
(temperature, weight: the same tuning budget) run on tuning seeds on digits with the homogeneous pair; the best
SA and the best KD variant (mean on the tuning seeds) are then run on the held-out seeds of the main table.
"""
import argparse
import csv
import json
import os
import shlex
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the checkout's benchmarks/ recipes (and the package, without an install)

import timm_sadistill as tsd  # noqa: E402
from benchmarks.data import CLASS_NAMES, write_image_folder  # noqa: E402
from benchmarks.launch import (  # noqa: E402
    RECIPE, parse_seeds, read_summary, run_train, schedule_flags)

IMG_SIZE = 64  # RECIPE's --img-size
# teacher -> student; 'hetero' crosses families (ConvNeXt stages vs ResNet layers, LayerNorm vs BatchNorm)
PAIRS = {'homo': ('resnet18', 'test_resnet'), 'hetero': ('convnext_atto', 'test_resnet')}
METHODS = ('none', *tsd.list_distill_losses())  # every registered loss; 'none' trains the student alone
# ablation variants: label -> (method, extra flags); 'sa' and 'kd' are the defaults
SA_VARIANTS: Dict[str, Tuple[str, List[str]]] = {
    'sa': ('sa', []),
    'sa alpha=0 (att only)': ('sa', ['--sa-alpha', '0']),
    'sa beta=0 (dist only)': ('sa', ['--sa-beta', '0']),
    'sa kd_weight=0': ('sa', ['--sa-kd-weight', '0']),
    'sa beta=1': ('sa', ['--sa-beta', '1']),
    'sa beta=30': ('sa', ['--sa-beta', '30']),
    'sa tau=1': ('sa', ['--sa-tau', '1']),
    'sa tau=8': ('sa', ['--sa-tau', '8']),
    'sa p=1': ('sa', ['--sa-p', '1']),
    'sa p=4': ('sa', ['--sa-p', '4']),
    'sa connector=conv1x1': ('sa', ['--sa-connector', 'conv1x1']),
    'sa stages=layer3 only': ('sa', ['--distill-stages', 'layer3', '--teacher-stages', 'layer3']),
}
KD_VARIANTS: Dict[str, Tuple[str, List[str]]] = {
    'kd': ('kd', []),
    'kd T=2': ('kd', ['--kd-temperature', '2']),
    'kd T=8': ('kd', ['--kd-temperature', '8']),
    'kd weight=2': ('kd', ['--distill-loss-weight', '2']),
    'kd weight=0.5': ('kd', ['--distill-loss-weight', '0.5']),
}


@dataclass(frozen=True)
class Run:
    """One student training: the cache key is (dataset, pair, label, seed)."""
    dataset: str
    pair: str
    label: str
    method: str
    extra: Tuple[str, ...]
    seed: int


def slug(text: str) -> str:
    """A label as a folder name."""
    return ''.join(c if c.isalnum() or c in '.-' else '_' for c in text)


class Bench:
    """Data, teachers and cached student runs under one cache folder."""

    def __init__(self, cache: str, per_class: int, threads: int, epochs: Optional[int] = None):
        self.cache = cache
        self.per_class = per_class
        self.threads = threads
        self.epochs = epochs  # overrides the teacher and student epochs (smoke runs)

    def schedule(self, dataset: str) -> List[str]:
        return schedule_flags(dataset, epochs=self.epochs)

    def data(self, dataset: str, per_class: Optional[int]) -> str:
        root = os.path.join(self.cache, 'data', f'{dataset}-' + ('full' if per_class is None else f'n{per_class}'))
        write_image_folder(dataset, root, size=IMG_SIZE, train_per_class=per_class)
        return root

    def teacher(self, dataset: str, model: str) -> Tuple[str, float]:
        """(checkpoint, final validation top-1) of the teacher, trained on the full split once."""
        output = os.path.join(self.cache, 'teachers')
        schedule = schedule_flags(dataset, teacher=True, epochs=self.epochs)
        experiment = f'{dataset}-{model}-e{schedule[1]}'  # a smoke run's teacher is never a benchmark's
        run_dir = os.path.join(output, experiment)
        checkpoint = os.path.join(run_dir, 'model.safetensors')
        if not os.path.isfile(checkpoint):
            print(f'training teacher {model} on {dataset} (full split)', flush=True)
            run_train([*RECIPE, *schedule, '--data-dir', self.data(dataset, None), '--model', model,
                       '--num-classes', str(len(CLASS_NAMES[dataset])), '--distill', 'none', '--seed', '0'],
                      output, experiment, threads=self.threads)
        return checkpoint, read_summary(run_dir)[-1]['eval_top1']

    def path(self, run: Run) -> str:
        # the schedule is part of the path, so runs of another schedule never mix into a table
        schedule = slug('_'.join(self.schedule(run.dataset)[:6]))
        return os.path.join(self.cache, 'runs', f'n{self.per_class}-{schedule}', run.dataset, run.pair,
                            slug(run.label), f'seed{run.seed}.json')

    def result(self, run: Run) -> Optional[dict]:
        path = self.path(run)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)

    def execute(self, run: Run) -> dict:
        """Train one student (or read its cached json)."""
        cached = self.result(run)
        if cached is not None:
            return cached
        teacher, student = PAIRS[run.pair]
        flags = [*RECIPE, *self.schedule(run.dataset), '--data-dir', self.data(run.dataset, self.per_class),
                 '--model', student, '--num-classes', str(len(CLASS_NAMES[run.dataset])), '--seed', str(run.seed),
                 '--distill', run.method]
        if run.method != 'none':
            checkpoint, _ = self.teacher(run.dataset, teacher)
            flags += ['--teacher', teacher, '--teacher-checkpoint', checkpoint]
        flags += list(run.extra)
        path = self.path(run)
        output = os.path.join(os.path.dirname(path), 'out')
        result = run_train(flags, output, f'seed{run.seed}', threads=self.threads).as_dict()
        result.update(dataset=run.dataset, pair=run.pair, label=run.label, method=run.method, seed=run.seed)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + '.tmp', 'w') as f:
            json.dump(result, f, indent=1)
        os.replace(path + '.tmp', path)  # a json exists only for a finished run
        print(f"{run.dataset:6s} {run.pair:6s} {run.label:32s} seed {run.seed}: top-1 {result['top1_final']:6.2f}  "
              f"({result['wall_s']:.0f} s)", flush=True)
        return result

    def execute_all(self, runs: Sequence[Run], jobs: int) -> List[dict]:
        # teachers and data first, serially: parallel runs must not write the same tree twice
        for run in runs:
            self.data(run.dataset, self.per_class)
            if run.method != 'none':
                self.teacher(run.dataset, PAIRS[run.pair][0])
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            return list(pool.map(self.execute, runs))


# ----------------------------------------------------------------------------------------------------------------
# Statistics and reports


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def by_seed(results: Iterable[dict], dataset: str, pair: str, label: str) -> Dict[int, float]:
    """seed -> final top-1 of one (dataset, pair, label)."""
    return {r['seed']: r['top1_final'] for r in results
            if r['dataset'] == dataset and r['pair'] == pair and r['label'] == label}


def paired(a: Dict[int, float], b: Dict[int, float]) -> Tuple[float, float, int, int]:
    """(mean of a-b, std of a-b, wins of a, n) over the seeds both have."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    if not diffs:
        return float('nan'), float('nan'), 0, 0
    mean, std = mean_std(diffs)
    return mean, std, sum(d > 0 for d in diffs), len(diffs)


def fmt(mean: float, std: float) -> str:
    return f'{mean:.1f} ± {std:.1f}'


def write_csv(path: str, results: Sequence[dict]) -> None:
    fields = ['dataset', 'pair', 'label', 'method', 'seed', 'top1_final', 'top1_best', 'epochs', 'wall_s', 'command']
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction='ignore')
        writer.writeheader()
        # commands relative to the checkout, so the file reads the same on every machine
        writer.writerows({**r, 'command': r['command'].replace(ROOT + os.sep, '')} for r in results)


def targets(results: Sequence[dict], dataset: str, pair: str) -> Tuple[str, bool]:
    """SA's target: mean top-1 at least 1 point above the best of KD, AT and FitNet."""
    means = {m: statistics.mean(by_seed(results, dataset, pair, m).values()) for m in ('sa', 'kd', 'at', 'fitnet')}
    best = max(('kd', 'at', 'fitnet'), key=means.get)
    margin = means['sa'] - means[best]
    return f'SA {means["sa"]:.1f} vs best baseline {best} {means[best]:.1f}: {margin:+.1f}', margin >= 1.0


def main_report(bench: Bench, results: Sequence[dict], datasets: Sequence[str], pairs: Sequence[str],
                methods: Sequence[str], seeds: Sequence[int], command: str) -> str:
    """accuracy.md: one table per (dataset, pair) with paired differences to SA and the accuracy target."""
    lines = ['# Accuracy: data-starved students, 64 px', '',
             f'Student train split: {bench.per_class} images a class; teachers: the full train split. '
             f'Schedule (every method): `{" ".join(RECIPE)}` plus, per dataset, '
             + ', '.join(f'{d}: `{" ".join(bench.schedule(d))}`' for d in datasets) + '. '
             f'Top-1 (%) on the validation split after the last epoch, mean ± std over seeds {seeds[0]}..{seeds[-1]} '
             f'(n = {len(seeds)}); Δ = paired difference of SA minus the method on the same seeds '
             '(mean ± std, SA wins / n). `none` uses no teacher, so its runs are the same on both pairs '
             '(the same numbers: a check that a seed reproduces a run).', '', f'Reproduce: `{command}`', '']
    for dataset in datasets:
        for pair in pairs:
            teacher, student = PAIRS[pair]
            _, teacher_top1 = bench.teacher(dataset, teacher)
            lines += [f'## {dataset}, {pair}: {teacher} (teacher top-1 {teacher_top1:.1f}) -> {student}', '',
                      '| method | top-1 | n | Δ SA − method | SA wins |', '|---|---|---|---|---|']
            sa = by_seed(results, dataset, pair, 'sa')
            for method in methods:
                acc = by_seed(results, dataset, pair, method)
                d_mean, d_std, wins, n = paired(sa, acc)
                delta = '' if method == 'sa' or not n else f'{d_mean:+.1f} ± {d_std:.1f}'
                lines.append(f'| {method} | {fmt(*mean_std(list(acc.values())))} | {len(acc)} | {delta} | '
                             f'{"" if method == "sa" or not n else f"{wins}/{n}"} |')
            if all(m in methods for m in ('sa', 'kd', 'at', 'fitnet')):
                text, met = targets(results, dataset, pair)
                lines += ['', f'Target (SA ≥ best of KD/AT/FitNet + 1): {text} -> **{"met" if met else "not met"}**']
            lines.append('')
    return '\n'.join(lines)


def plot(path: str, results: Sequence[dict], datasets: Sequence[str], pairs: Sequence[str],
         methods: Sequence[str]) -> None:
    """accuracy.png: one bar panel per (dataset, pair), mean top-1 with std error bars."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    panels = [(d, p) for d in datasets for p in pairs]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
    for ax, (dataset, pair) in zip(axes[0], panels):
        stats = [mean_std(list(by_seed(results, dataset, pair, m).values())) for m in methods]
        ax.bar(range(len(methods)), [s[0] for s in stats], yerr=[s[1] for s in stats], capsize=3,
               color=['tab:red' if m == 'sa' else 'tab:gray' if m == 'none' else 'tab:blue' for m in methods])
        ax.set_xticks(range(len(methods)), methods, rotation=45)
        low = min(s[0] - s[1] for s in stats)
        ax.set_ylim(max(0.0, low - 5), 101)  # room for the error bars of runs at 100%
        ax.set_title(f'{dataset}, {pair}: {PAIRS[pair][0]} -> {PAIRS[pair][1]}', fontsize=9)
        ax.set_ylabel('top-1 (%)')
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def ablation_report(results: Sequence[dict], tuning: Sequence[int], heldout: Sequence[dict], best: Dict[str, str],
                    held_labels: Sequence[str], command: str) -> str:
    """ablation.md: the variants on the tuning seeds, then the chosen ones on the held-out seeds."""
    lines = ['# Ablation of SA, and KD with the same tuning budget (digits, homo: resnet18 -> test_resnet)', '',
             f'Tuning seeds {tuning[0]}..{tuning[-1]} (n = {len(tuning)}): top-1 mean ± std, '
             'Δ = paired difference to the default `sa` and to the default `kd` on the same seeds.', '',
             f'Reproduce: `{command}`', '',
             '| variant | flags | top-1 | Δ vs sa | Δ vs kd |', '|---|---|---|---|---|']
    sa = by_seed(results, 'digits', 'homo', 'sa')
    kd = by_seed(results, 'digits', 'homo', 'kd')
    for label, (_, extra) in {**SA_VARIANTS, **KD_VARIANTS}.items():
        acc = by_seed(results, 'digits', 'homo', label)
        if not acc:
            continue
        d_sa = paired(acc, sa)
        d_kd = paired(acc, kd)
        lines.append(f'| {label} | `{" ".join(extra)}` | {fmt(*mean_std(list(acc.values())))} | '
                     f'{d_sa[0]:+.1f} ± {d_sa[1]:.1f} | {d_kd[0]:+.1f} ± {d_kd[1]:.1f} |')
    lines += ['', f'Best on the tuning seeds: SA variant `{best["sa"]}`, KD variant `{best["kd"]}`.', '']
    if heldout:
        seeds = sorted({r['seed'] for r in heldout})
        lines += [f'Held-out seeds {seeds[0]}..{seeds[-1]} (n = {len(seeds)}), the main table\'s:', '',
                  '| variant | top-1 | Δ vs kd (default) | wins vs kd | Δ vs sa (default) |', '|---|---|---|---|---|']
        kd_held = by_seed(heldout, 'digits', 'homo', 'kd')
        sa_held = by_seed(heldout, 'digits', 'homo', 'sa')
        for label in held_labels:
            acc = by_seed(heldout, 'digits', 'homo', label)
            d, d_sa = paired(acc, kd_held), paired(acc, sa_held)
            lines.append(f'| {label} | {fmt(*mean_std(list(acc.values())))} | {d[0]:+.1f} ± {d[1]:.1f} | '
                         f'{d[2]}/{d[3]} | {d_sa[0]:+.1f} ± {d_sa[1]:.1f} |')
        sa_best = by_seed(heldout, 'digits', 'homo', best['sa'])
        kd_best = by_seed(heldout, 'digits', 'homo', best['kd'])
        d = paired(sa_best, kd_best)
        lines += ['', f'Tuned SA vs tuned KD on the held-out seeds: {d[0]:+.1f} ± {d[1]:.1f} (SA wins {d[2]}/{d[3]}).']
    return '\n'.join(lines) + '\n'


# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--mode', choices=['main', 'ablation'], default='main')
    parser.add_argument('--datasets', default='digits,lfw')
    parser.add_argument('--pairs', default='homo,hetero')
    parser.add_argument('--methods', default=','.join(METHODS))
    parser.add_argument('--seeds', default='0-4', help='main table seeds (the ablation\'s held-out seeds)')
    parser.add_argument('--tuning-seeds', default='100-102', help='ablation tuning seeds')
    parser.add_argument('--heldout-extra', type=lambda s: [v for v in s.split(',') if v], default=[],
                        help="ablation: more variant labels to run on the held-out seeds, e.g. 'sa connector=conv1x1'")
    parser.add_argument('--per-class', type=int, default=10, help='student train images a class')
    parser.add_argument('--epochs', type=int, default=None, help='override the student epochs (smoke runs)')
    parser.add_argument('--jobs', type=int, default=2, help='runs in parallel')
    parser.add_argument('--threads', type=int, default=1, help='torch threads of each run')
    parser.add_argument('--cache', default=os.path.join(ROOT, 'benchmarks', '.cache'))
    parser.add_argument('--results', default=os.path.join(ROOT, 'benchmarks', 'results', 'superseded'))
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    command = shlex.join(['python', 'benchmarks/accuracy.py', *(sys.argv[1:] if argv is None else argv)])
    bench = Bench(args.cache, args.per_class, args.threads, args.epochs)
    seeds = parse_seeds(args.seeds)
    os.makedirs(args.results, exist_ok=True)
    if args.mode == 'main':
        datasets, pairs, methods = args.datasets.split(','), args.pairs.split(','), args.methods.split(',')
        # seed-major order: an interrupted benchmark still has whole seeds to compare
        runs = [Run(d, p, m, m, (), s) for s in seeds for d in datasets for p in pairs for m in methods]
        results = bench.execute_all(runs, args.jobs)
        write_csv(os.path.join(args.results, 'accuracy.csv'), results)
        with open(os.path.join(args.results, 'accuracy.md'), 'w') as f:
            f.write(main_report(bench, results, datasets, pairs, methods, seeds, command))
        plot(os.path.join(args.results, 'accuracy.png'), results, datasets, pairs, methods)
    else:
        tuning = parse_seeds(args.tuning_seeds)
        variants = {**SA_VARIANTS, **KD_VARIANTS}
        runs = [Run('digits', 'homo', label, method, tuple(extra), s)
                for s in tuning for label, (method, extra) in variants.items()]
        results = bench.execute_all(runs, args.jobs)
        means = {label: statistics.mean(by_seed(results, 'digits', 'homo', label).values()) for label in variants}
        best = {'sa': max(SA_VARIANTS, key=means.get), 'kd': max(KD_VARIANTS, key=means.get)}
        # dict.fromkeys: the defaults and the winners, once each when a default wins
        held_labels = list(dict.fromkeys(['sa', best['sa'], 'kd', best['kd'], *args.heldout_extra]))
        held = [Run('digits', 'homo', label, variants[label][0], tuple(variants[label][1]), s)
                for s in seeds for label in held_labels]
        heldout = bench.execute_all(held, args.jobs)
        write_csv(os.path.join(args.results, 'ablation.csv'), results + heldout)
        with open(os.path.join(args.results, 'ablation.md'), 'w') as f:
            f.write(ablation_report(results, tuning, heldout, best, held_labels, command))
    print(f'results in {args.results}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
