"""The second SA search's decision, as `benchmarks/results/sa-search-v2/rule.md` (with its Amendment 1) fixes it.

    python benchmarks/sa_decision.py --select                 # tuned KD / DIST per setting and the held-out specs
    python benchmarks/sa_decision.py --out benchmarks/results/sa-search-v2/decision.md   # the rule on held-out runs

Both read the runs `benchmarks/sa_search.py` cached (``--cache``); nothing trains here. The grids and SA's
configurations are the specs of ``tuning-specs.txt``: ``kd...`` the KD grid, ``dist...`` the DIST grid, ``sa...``
SA's. Tuned KD and tuned DIST of a setting are the grid cells with the best mean top-1 over its tuning seeds
(digits-mobile, digits-weak and shapes-homo, which have no tuning runs: the best mean of the digits-homo and
digits-hetero means), ties to the lower temperature, then the lower weight (the file lists the grids that way).

The rule: the new default is the SA configuration with the best mean over the six settings of its mean paired gain
over tuned KD, among those that (a) are on no setting below ``sa`` (the current defaults) by more than one standard
error of the paired difference, (b) are not below no distillation on textures-biased and digits-weak, and
(c) cost at most 1.10x KD's training-step FLOPs at resnet50 -> resnet18, 224 px, 1000 classes (counted here with
``overhead.flops_methods``). If none passes all three: the best worst-setting gain among those passing (a) and (c).
"""
import argparse
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from benchmarks import sa_search  # noqa: E402

RESULTS = os.path.join(ROOT, 'benchmarks', 'results', 'sa-search-v2')
TUNING_SEEDS = {'digits-homo': range(100, 104), 'digits-hetero': range(100, 104), 'textures-biased': range(100, 106)}
POOLED = ('digits-homo', 'digits-hetero')  # the selection of the settings without tuning runs
# 0-9 on every setting (Amendment 2 of rule.md: the 0-19 on digits-homo and digits-hetero did not fit)
HELD_OUT_SEEDS = {s: range(10) for s in ('digits-homo', 'digits-hetero', 'digits-mobile', 'digits-weak', 'shapes-homo',
                                         'textures-biased')}
MUST_NOT_HURT = ('textures-biased', 'digits-weak')  # (b): where KD hurts, and the weak teacher
REFERENCE = 'sa'  # SA's defaults when the search began: the reference of (a)
NAMED = 'sa[cam_weight=1,connector=conv1x1]'  # the pair the issue names; always held out
MAX_COST = 1.10  # (c): x KD's training-step FLOPs
VIEWS = 30


def tuning_specs(path: str = os.path.join(RESULTS, 'tuning-specs.txt')) -> Dict[str, List[str]]:
    """{'none', 'kd', 'dist', 'sa'} and any other method the file lists (another baseline's grid, e.g. 'lskd') ->
    the specs of tuning-specs.txt of that method, in the file's order."""
    with open(path) as f:
        specs = f.read().strip().split(';')
    groups: Dict[str, List[str]] = {'none': [], 'kd': [], 'dist': [], 'sa': []}
    for spec in specs:
        groups.setdefault(spec.partition('[')[0], []).append(spec)
    return groups


def every_run(cache: str, setting: str, spec: str, seeds: Sequence[int]) -> Dict[int, Dict]:
    """seed -> the cached run; refuses a missing run (a decision on part of the seeds is another one)."""
    runs = sa_search.load_runs(cache, setting, spec, seeds, VIEWS, None)
    if len(runs) < len(seeds):
        missing = sorted(set(seeds) - set(runs))
        raise SystemExit(f'{setting} {spec}: no run for seeds {missing}; run them with benchmarks/sa_search.py first.')
    return runs


def top1(cache: str, setting: str, spec: str, seeds: Sequence[int]) -> Dict[int, float]:
    """seed -> top-1 of the cached runs (`every_run`)."""
    return {seed: run['top1'] for seed, run in every_run(cache, setting, spec, seeds).items()}


def seeds_cell(seeds: Optional[Sequence[int]]) -> str:
    """A selection table's tuning-seeds cell: the range, or where a setting without tuning runs takes its cells."""
    return f'{seeds[0]}-{seeds[-1]}' if seeds else f'none: the pooled {" and ".join(POOLED)} selection'


def tuned(cache: str, grid: Sequence[str]) -> Dict[str, str]:
    """setting -> the tuned cell of ``grid`` (see the module doc)."""
    def mean(setting: str, spec: str) -> float:
        return float(np.mean(list(top1(cache, setting, spec, TUNING_SEEDS[setting]).values())))

    def best(score) -> str:
        return max(grid, key=lambda spec: (score(spec), -grid.index(spec)))

    chosen = {s: best(lambda spec, s=s: mean(s, spec)) for s in TUNING_SEEDS}
    pooled = best(lambda spec: float(np.mean([mean(s, spec) for s in POOLED])))
    return {s: chosen.get(s, pooled) for s in HELD_OUT_SEEDS}


def paired(a: Dict[int, float], b: Dict[int, float]) -> Tuple[float, float, int, int]:
    return sa_search.paired_stats(a, b)


def held_out_candidates(cache: str, specs: Dict[str, List[str]], kd: Dict[str, str]) -> List[str]:
    """SA's configurations for the held-out runs (Amendment 1, item 5), from the tuning runs only."""
    sa_specs = [s for s in specs['sa'] if s != REFERENCE]

    def gain(spec: str, settings: Sequence[str]) -> float:
        return float(np.mean([paired(top1(cache, s, spec, TUNING_SEEDS[s]), top1(cache, s, kd[s], TUNING_SEEDS[s]))[0]
                              for s in settings]))

    best = max(sa_specs, key=lambda spec: (gain(spec, list(TUNING_SEEDS)), -sa_specs.index(spec)))
    chosen = [NAMED] + ([best] if best != NAMED else [])
    if 'teacher_confidence' not in best:
        confident = [s for s in sa_specs if 'teacher_confidence' in s]
        chosen.append(max(confident, key=lambda spec: (gain(spec, ['textures-biased']), -confident.index(spec))))
    return chosen


def fmt(m: float, se: float, wins: int, n: int) -> str:
    return f'{m:+.2f} ± {se:.2f} ({wins}/{n})'


def decide(cache: str, candidates: Sequence[str], kd: Dict[str, str], dist: Dict[str, str],
           cost: Dict[str, float]) -> str:
    """The markdown tables of the held-out runs and the decision by the rule."""
    settings = list(HELD_OUT_SEEDS)
    acc = {(s, spec): top1(cache, s, spec, HELD_OUT_SEEDS[s])
           for s in settings for spec in {'none', REFERENCE, kd[s], dist[s], *candidates}}
    lines = ['## Held-out runs, paired by seed (mean ± standard error of the difference, wins / seeds)', '',
             '| setting | n | teacher | none | tuned KD | tuned DIST | ' + ' | '.join(f'`{c}`' for c in candidates) + ' |',
             '|---|---|---|---|---|---|' + '---|' * len(candidates)]
    for s in settings:
        teacher = sa_search.load_runs(cache, s, 'none', [0], VIEWS, None)[0]['teacher_top1']
        mean = {spec: np.mean(list(acc[s, spec].values())) for spec in {'none', kd[s], dist[s], *candidates}}
        lines.append(f'| {s} | {len(HELD_OUT_SEEDS[s])} | {teacher:.1f} | {mean["none"]:.2f} | {mean[kd[s]]:.2f} '
                     f'(`{kd[s]}`) | {mean[dist[s]]:.2f} (`{dist[s]}`) | '
                     + ' | '.join(f'{mean[c]:.2f}' for c in candidates) + ' |')
    verdicts = []
    for c in candidates:
        lines += ['', f'### `{c}`', '', '| setting | − tuned KD | − tuned DIST | − none | − `sa` |', '|---|---|---|---|---|']
        gains, a_ok, b_ok = [], True, True
        for s in settings:
            vs = {ref: paired(acc[s, c], acc[s, ref]) for ref in (kd[s], dist[s], 'none', REFERENCE)}
            gains.append(vs[kd[s]][0])
            m, se = vs[REFERENCE][:2]
            a_ok &= c == REFERENCE or not m < -se
            b_ok &= s not in MUST_NOT_HURT or vs['none'][0] >= 0
            lines.append(f'| {s} | ' + ' | '.join(fmt(*vs[ref]) if not (c == REFERENCE and ref == REFERENCE) else ''
                                                   for ref in (kd[s], dist[s], 'none', REFERENCE)) + ' |')
        verdicts.append((c, float(np.mean(gains)), float(min(gains)), a_ok, b_ok, cost[c] <= MAX_COST))
    lines += ['', '## The rule', '', '| configuration | mean gain over tuned KD | worst setting | (a) vs `sa` | '
              '(b) not below none | (c) FLOPs x KD |', '|---|---|---|---|---|---|']
    for c, mean_gain, worst, a_ok, b_ok, c_ok in verdicts:
        lines.append(f'| `{c}` | {mean_gain:+.2f} | {worst:+.2f} | {"pass" if a_ok else "fail"} | '
                     f'{"pass" if b_ok else "fail"} | {cost[c]:.2f} ({"pass" if c_ok else "fail"}) |')
    passing = [v for v in verdicts if v[3] and v[4] and v[5]]
    if passing:
        choice = max(passing, key=lambda v: v[1])
        why = f'it passes (a), (b) and (c) and has the best mean gain over tuned KD of those that do ({choice[1]:+.2f})'
    else:
        fallback = [v for v in verdicts if v[3] and v[5]]
        if not fallback:
            return '\n'.join(lines + ['', '**Decision:** nothing passes (a) and (c): the defaults stay.'])
        choice = max(fallback, key=lambda v: v[2])
        why = (f'nothing passes all three; of those passing (a) and (c) it has the best worst-setting gain over tuned '
               f'KD ({choice[2]:+.2f})')
    return '\n'.join(lines + ['', f'**Decision:** `{choice[0]}`: {why}.'])


def costs(specs: Sequence[str]) -> Dict[str, float]:
    """spec -> its training-step FLOPs over KD's at resnet50 -> resnet18, 224 px, 1000 classes."""
    from benchmarks import overhead
    flops, _ = overhead.flops_methods(['kd', *specs], 'resnet50', 'resnet18', 224)
    return {spec: flops[spec].step / flops['kd'].step for spec in specs}


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--cache', default=os.path.join(ROOT, 'benchmarks', '.cache', 'sa_search'))
    ap.add_argument('--select', action='store_true', help='print the tuned baselines and the held-out specs only')
    ap.add_argument('--out', help='also write the decision (markdown) here')
    args = ap.parse_args(argv)
    specs = tuning_specs()
    kd, dist = tuned(args.cache, specs['kd']), tuned(args.cache, specs['dist'])
    candidates = held_out_candidates(args.cache, specs, kd)
    selection = ['## Selection (tuning runs only)', '', '| setting | tuning seeds | tuned KD | tuned DIST |',
                 '|---|---|---|---|']
    for s in HELD_OUT_SEEDS:
        selection.append(f'| {s} | {seeds_cell(TUNING_SEEDS.get(s))} | `{kd[s]}` | `{dist[s]}` |')
    selection += ['', 'SA configurations for the held-out runs: ' + ', '.join(f'`{c}`' for c in [REFERENCE, *candidates])]
    text = '\n'.join(selection)
    if not args.select:
        text += '\n\n' + decide(args.cache, [REFERENCE, *candidates], kd, dist, costs([REFERENCE, *candidates]))
    print(text)
    if args.out:
        with open(args.out, 'w') as f:
            what, flag = ('selection', '--select ') if args.select else ('decision', '')
            f.write(f'# SA search v2: the {what}\n\nMade by `python benchmarks/sa_decision.py {flag}--out '
                    f'{os.path.relpath(args.out, ROOT)}` from the cached runs of `benchmarks/sa_search.py`; the rule is '
                    '[rule.md](rule.md).\n\n' + text + '\n')


if __name__ == '__main__':
    main()
