"""The weak-teacher search's selection, decision and time claim, as `benchmarks/results/weak-teacher/rule.md` fixes them.

    python benchmarks/weak_teacher_decision.py --select --out benchmarks/results/weak-teacher/selection.md
    python benchmarks/weak_teacher_decision.py --out benchmarks/results/weak-teacher/decision.md
    python benchmarks/weak_teacher_decision.py --round 2 --out benchmarks/results/weak-teacher/decision-round2.md

``--round N`` chooses among round N's candidates (`ROUNDS`: 2 and 3 are the rule's Amendments 2 and 3) and decides on
that one with the round's held-out seeds.

Both read the runs `benchmarks/sa_search.py` cached (``--cache``), and the second search's tuning runs
(`results/sa-search-v2/tuning-*.csv`) for tuned KD and DIST on its six settings; nothing trains here. The decision
also writes ``curves.png`` beside ``--out``: each setting's mean validation curves against epoch and training time.
"""
import argparse
import csv
import os
import sys
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from benchmarks import sa_decision, sa_search  # noqa: E402

RESULTS = os.path.join(ROOT, 'benchmarks', 'results', 'weak-teacher')
SECOND_SEARCH_TUNING = [os.path.join(sa_decision.RESULTS, f'tuning-{name}.csv') for name in ('digits', 'textures')]
SETTINGS = ('digits-homo', 'digits-hetero', 'digits-mobile', 'digits-weak', 'shapes-homo', 'textures-biased',
            'photos-weak', 'photos-worse')
TUNING_SEEDS = {**sa_decision.TUNING_SEEDS, 'photos-weak': range(100, 106), 'photos-worse': range(100, 106)}
POOLED = sa_decision.POOLED
HELD_OUT_SEEDS = {1: range(10), 2: range(10), 3: range(10, 20)}  # each round's; the third's are fresh (Amendment 3)
REFERENCE = 'sa'  # SA's defaults today
# each round's candidates, in the order that breaks ties: the logit term's mechanisms (the rule), then those on the
# whole distillation term (its Amendment 2; `fade_by` and `ramp_by` are sa_search's schedules of the distill weight)
ROUNDS = {
    1: ('sa[logit_weighting=teacher_correct]', 'sa[teacher_correction=swap]', 'sa[logit_loss=lskd,temperature=2.0]'),
    2: ('sa[gate=while_ahead]', 'sa[gate=until_caught_up]', 'sa[fade_by=1.0]', 'sa[fade_by=0.5]', 'sa[ramp_by=0.5]',
        'sa[gate=while_ahead,ramp_by=0.5]'),
    3: ('sa[ramp_by=0.75]', 'sa[ramp_by=1.0]'),
}
BASELINES = ('kd', 'dist', 'lskd')  # the tuned ones, grids in sa_search.BASELINE_GRIDS
MAX_COST = sa_decision.MAX_COST


@lru_cache(maxsize=None)
def second_search_runs(paths: Tuple[str, ...]) -> Dict[Tuple[str, str], Dict[int, float]]:
    """(setting, spec) -> seed -> top-1 of the second search's tuning runs in the csv files ``paths``."""
    runs: Dict[Tuple[str, str], Dict[int, float]] = {}
    for path in paths:
        with open(path) as f:
            for row in csv.DictReader(f):
                runs.setdefault((row['setting'], row['spec']), {})[int(row['seed'])] = float(row['top1'])
    return runs


def tuning_top1(cache: str, setting: str, spec: str) -> Dict[int, float]:
    """seed -> top-1 of a tuning run: KD and DIST on the second search's settings from its runs (its selection is
    kept, rule.md), everything else from the cache."""
    method = spec.partition('[')[0]
    if method in ('kd', 'dist') and setting in sa_decision.TUNING_SEEDS:
        runs = second_search_runs(tuple(SECOND_SEARCH_TUNING)).get((setting, spec), {})
        return {seed: runs[seed] for seed in TUNING_SEEDS[setting] if seed in runs}
    return sa_decision.top1(cache, setting, spec, TUNING_SEEDS[setting])


def tuned(cache: str, method: str) -> Dict[str, str]:
    """setting -> the cell of ``method``'s grid with the best mean top-1 over the setting's tuning seeds (settings
    without tuning runs: the best mean of the `POOLED` settings' means); ties to the grid's earlier cell."""
    grid = list(sa_search.BASELINE_GRIDS[method])

    def mean(setting: str, spec: str) -> float:
        return float(np.mean(list(tuning_top1(cache, setting, spec).values())))

    def best(score) -> str:
        return max(grid, key=lambda spec: (score(spec), -grid.index(spec)))

    chosen = {s: best(lambda spec, s=s: mean(s, spec)) for s in TUNING_SEEDS}
    pooled = best(lambda spec: float(np.mean([mean(s, spec) for s in POOLED])))
    return {s: chosen.get(s, pooled) for s in SETTINGS}


def chosen_mechanism(cache: str, candidates: Sequence[str]) -> Tuple[str, List[str]]:
    """The candidate of rule.md's choice and the table lines behind it (tuning runs only)."""
    def gain(spec: str, setting: str, reference: str) -> float:
        return sa_decision.paired(tuning_top1(cache, setting, spec), tuning_top1(cache, setting, reference))[0]

    scores = {m: (min(gain(m, s, 'none') for s in TUNING_SEEDS),
                  float(np.mean([gain(m, s, REFERENCE) for s in TUNING_SEEDS])) if m != REFERENCE else 0.0)
              for m in (REFERENCE, *candidates)}
    lines = ['| configuration | ' + ' | '.join(f'{s} − none' for s in TUNING_SEEDS) + ' | worst | mean − `sa` |',
             '|---|' + '---|' * (len(TUNING_SEEDS) + 2)]
    for spec, (worst, over_sa) in scores.items():
        cells = [sa_decision.fmt(*sa_decision.paired(tuning_top1(cache, s, spec), tuning_top1(cache, s, 'none')))
                 for s in TUNING_SEEDS]
        lines.append(f'| `{spec}` | ' + ' | '.join(cells) + f' | {worst:+.2f} | {over_sa:+.2f} |')
    return max(candidates, key=lambda m: (scores[m], -candidates.index(m))), lines


def held_out(cache: str, setting: str, spec: str, seeds: Sequence[int]) -> Dict[int, dict]:
    """seed -> the held-out run of each of ``seeds`` (refuses a missing one)."""
    return sa_decision.every_run(cache, setting, spec, seeds)


def verdict(m: float, se: float) -> str:
    return 'tie' if abs(m) <= se else ('win' if m > 0 else 'loss')


def decide(cache: str, mechanism: str, baselines: Dict[str, Dict[str, str]], cost: Dict[str, float],
           seeds: Sequence[int] = HELD_OUT_SEEDS[1]) -> List[str]:
    """The held-out tables and the decision by rule.md."""
    configs = ('none', REFERENCE, mechanism)
    acc = {(s, spec): {seed: run['top1'] for seed, run in held_out(cache, s, spec, seeds).items()}
           for s in SETTINGS for spec in {*configs, *(baselines[b][s] for b in BASELINES)}}

    def mean(s: str, spec: str) -> float:
        return float(np.mean(list(acc[s, spec].values())))

    best = {s: max((baselines[b][s] for b in BASELINES), key=lambda spec: mean(s, spec)) for s in SETTINGS}
    lines = [f'## Held-out runs (seeds {sa_decision.seeds_cell(seeds)}): mean top-1', '',
             '| setting | teacher | none | `sa` | `' + mechanism + '` | tuned KD | tuned DIST | tuned LSKD |',
             '|---|---|---|---|---|---|---|---|']
    for s in SETTINGS:
        teacher = next(iter(held_out(cache, s, 'none', seeds).values()))['teacher_top1']
        cells = [f'{mean(s, spec):.2f}' for spec in configs]
        cells += [f'{mean(s, baselines[b][s]):.2f}' + (' (best)' if baselines[b][s] == best[s] else '') for b in BASELINES]
        lines.append(f'| {s} | {teacher:.1f} | ' + ' | '.join(cells) + ' |')
    gains = {}
    for config in (REFERENCE, mechanism):
        lines += ['', f'### `{config}`, paired differences (mean ± SE (wins/{len(seeds)}), verdict)', '',
                  '| setting | − none | − `sa` | − tuned KD | − tuned DIST | − tuned LSKD | − best tuned |',
                  '|---|---|---|---|---|---|---|']
        for s in SETTINGS:
            refs = ['none', REFERENCE, *(baselines[b][s] for b in BASELINES), best[s]]
            cells = []
            for ref in refs:
                if ref == config:
                    cells.append('')
                    continue
                m, se, wins, n = sa_decision.paired(acc[s, config], acc[s, ref])
                cells.append(f'{sa_decision.fmt(m, se, wins, n)} {verdict(m, se)}')
            lines.append(f'| {s} | ' + ' | '.join(cells) + ' |')
        gains[config] = {s: sa_decision.paired(acc[s, config], acc[s, best[s]]) for s in SETTINGS}
    lines += rule_lines(acc, mechanism, gains, cost)
    return lines


def rule_lines(acc, mechanism: str, gains, cost: Dict[str, float]) -> List[str]:
    """Criteria (a)-(d) for the mechanism, the decision, and whether the defaults fall below none anywhere."""
    def below(config: str, ref: str) -> List[str]:
        out = []
        for s in SETTINGS:
            m, se, _, _ = sa_decision.paired(acc[s, config], acc[s, ref])
            if m < -se:
                out.append(f'{s} ({m:+.2f} ± {se:.2f})')
        return out

    mean_gain = {c: float(np.mean([gains[c][s][0] for s in SETTINGS])) for c in gains}
    checks = {
        '(a) nowhere below `sa` by more than one SE': below(mechanism, REFERENCE),
        '(b) nowhere below none by more than one SE': below(mechanism, 'none'),
    }
    passed = {name: not failing for name, failing in checks.items()}
    passed['(c) mean gain over the best tuned baseline at least `sa`\'s'] = mean_gain[mechanism] >= mean_gain[REFERENCE]
    passed['(d) at most 1.10x KD\'s FLOPs'] = cost[mechanism] <= MAX_COST
    lines = ['', '## The rule', '', f'Mean over the eight settings of the paired gain over the best tuned baseline: '
             f'`sa` {mean_gain[REFERENCE]:+.2f}, `{mechanism}` {mean_gain[mechanism]:+.2f}. Training-step FLOPs x KD '
             f'at resnet50 -> resnet18, 224 px: `sa` {cost[REFERENCE]:.2f}, `{mechanism}` {cost[mechanism]:.2f}.', '',
             '| criterion | result |', '|---|---|']
    for name, ok in passed.items():
        failing = checks.get(name)
        lines.append(f'| {name} | {"pass" if ok else "fail: " + ", ".join(failing or ["no"])} |')
    default = mechanism if all(passed.values()) else REFERENCE
    below_none = below(default, 'none')
    lines += ['', f'**Decision:** `{default}` ' + ('becomes the default: it passes (a)-(d).' if default != REFERENCE else
                                                 'stays the default: the mechanism does not pass all four.'),
              '', '**Below no distillation by more than one SE, with the defaults:** ' +
              (', '.join(below_none) if below_none else 'nowhere.')]
    return lines


def time_claim(cache: str, mechanism: str, baselines: Dict[str, Dict[str, str]], png: Optional[str],
               seeds: Sequence[int] = HELD_OUT_SEEDS[1]) -> List[str]:
    """Per setting: the epoch and the training seconds at which each configuration's mean curve first reaches tuned
    KD's final mean top-1, and its seconds per step as a ratio to tuned KD's; the curves as a plot."""
    lines = ['', '## Time to tuned KD\'s accuracy (held-out curves, validation every 5 epochs)', '',
             f"Epoch / training seconds at which the mean curve over seeds {sa_decision.seeds_cell(seeds)} first "
             "reaches tuned KD's final mean "
             "top-1 ('never': not within the run); step time as a ratio to tuned KD's step on the same setting (this "
             "machine's CPU, two runs at a time).", '',
             '| setting | target | ' + ' | '.join(('`sa`', f'`{mechanism}`', 'tuned KD', 'tuned DIST', 'tuned LSKD',
                                                    'none')) + ' |', '|---|---|' + '---|' * 6]
    curves = {}
    for s in SETTINGS:
        specs = (REFERENCE, mechanism, *(baselines[b][s] for b in BASELINES), 'none')
        mean_curves = {spec: mean_curve(held_out(cache, s, spec, seeds)) for spec in specs}
        curves[s] = mean_curves
        kd = mean_curves[baselines['kd'][s]]
        target = kd[-1, 1]
        kd_step = kd[-1, 2]
        cells = []
        for spec in specs:
            c = mean_curves[spec]
            hit = np.nonzero(c[:, 1] >= target - 1e-9)[0]
            reach = f'epoch {int(c[hit[0], 0])}, {c[hit[0], 2]:.1f} s' if len(hit) else 'never'
            cells.append(f'{reach}; step {c[-1, 2] / kd_step:.2f}x')
        lines.append(f'| {s} | {target:.2f} | ' + ' | '.join(cells) + ' |')
    if png:
        plot(curves, mechanism, baselines, png)
        lines += ['', f'![mean curves]({os.path.basename(png)})']
    return lines


def mean_curve(runs: Dict[int, dict]) -> np.ndarray:
    """(points, 3): epoch, mean top-1 and mean training seconds over the runs' curves (the same epochs in each)."""
    return np.mean([np.array(run['curve'], dtype=float) for run in runs.values()], axis=0)


def plot(curves, mechanism: str, baselines, png: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, len(SETTINGS), figsize=(3.2 * len(SETTINGS), 6.4), squeeze=False)
    for col, s in enumerate(SETTINGS):
        names = {REFERENCE: 'sa', mechanism: 'mechanism', baselines['kd'][s]: 'tuned KD',
                 baselines['dist'][s]: 'tuned DIST', baselines['lskd'][s]: 'tuned LSKD', 'none': 'none'}
        for spec, c in curves[s].items():
            for row, x in enumerate((c[:, 0], c[:, 2])):
                axes[row, col].plot(x, c[:, 1], marker='.', label=names[spec])
        axes[0, col].set_title(s, fontsize=9)
        axes[0, col].set_xlabel('epoch', fontsize=8)
        axes[1, col].set_xlabel('training seconds', fontsize=8)
    axes[0, 0].set_ylabel('top-1 (%)')
    axes[1, 0].set_ylabel('top-1 (%)')
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--cache', default=os.path.join(ROOT, 'benchmarks', '.cache', 'sa_search'))
    ap.add_argument('--select', action='store_true', help='the tuned baselines and the mechanism only')
    ap.add_argument('--out', help='also write the result (markdown) here')
    ap.add_argument('--round', type=int, choices=sorted(ROUNDS), default=1,
                    help="the round of candidates: 1, the logit term's (rule.md); 2, the whole term's (Amendment 2); "
                    "3, longer ramps on fresh held-out seeds (Amendment 3)")
    args = ap.parse_args(argv)
    baselines = {b: tuned(args.cache, b) for b in BASELINES}
    mechanism, table = chosen_mechanism(args.cache, ROUNDS[args.round])
    lines = ['## Selection (tuning runs only)', '', '| setting | tuning seeds | tuned KD | tuned DIST | tuned LSKD |',
             '|---|---|---|---|---|']
    for s in SETTINGS:
        lines.append(f'| {s} | {sa_decision.seeds_cell(TUNING_SEEDS.get(s))} | ' + ' | '.join(f'`{baselines[b][s]}`' for b in BASELINES) + ' |')
    lines += ['', 'Mechanisms on the tuning seeds, paired against none (mean ± SE (wins/n)):', '', *table, '',
              f'**Chosen mechanism:** `{mechanism}`.']
    if not args.select:
        # a schedule of the distill weight adds no work to a step: the cost is that of the loss it schedules
        cost = sa_decision.costs([REFERENCE, sa_search.without_schedules(mechanism)])
        cost[mechanism] = cost[sa_search.without_schedules(mechanism)]
        lines += [''] + decide(args.cache, mechanism, baselines, cost, HELD_OUT_SEEDS[args.round])
        png = (os.path.join(os.path.dirname(args.out), 'curves.png' if args.round == 1 else f'curves-round{args.round}.png')
               if args.out else None)
        lines += time_claim(args.cache, mechanism, baselines, png, HELD_OUT_SEEDS[args.round])
    text = '\n'.join(lines)
    print(text)
    if args.out:
        what, flag = ('selection', '--select ') if args.select else ('decision', '')
        flag += f'--round {args.round} ' if args.round != 1 else ''
        with open(args.out, 'w') as f:
            f.write(f'# Weak-teacher search: the {what}\n\nMade by `python benchmarks/weak_teacher_decision.py {flag}'
                    f'--out {os.path.relpath(args.out, ROOT)}` from the cached runs of `benchmarks/sa_search.py`; the '
                    'rule is [rule.md](rule.md).\n\n' + text + '\n')


if __name__ == '__main__':
    main()
