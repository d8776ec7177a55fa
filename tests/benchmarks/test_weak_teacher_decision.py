"""benchmarks/weak_teacher_decision.py: the selection, the rule and the time claim, on cached runs written here."""
import csv
import json
import os

import pytest

from benchmarks import sa_decision, sa_search
from benchmarks import weak_teacher_decision as wtd

M1, M2, M3 = wtd.ROUNDS[1]
KD_CELLS, DIST_CELLS, LSKD_CELLS = (sa_search.BASELINE_GRIDS[b] for b in wtd.BASELINES)


def write(cache, setting, spec, seed, top1, curve=None):
    s = sa_search.SETTINGS[setting]
    path = sa_search.run_path(str(cache), s, sa_decision.VIEWS, s.epochs, spec, seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        json.dump({'top1': top1, 'teacher_top1': 95.0, 'curve': curve or [[s.epochs, top1, 10.0]]}, f)


def noise(seed, spec):
    """A little seed noise, so that every paired difference has an error."""
    return 0.01 * (seed % 3 - 1) * (spec != 'none')


def fill_tuning(cache, value, monkeypatch):
    """Tuning runs of every grid cell and configuration; KD and DIST of the second search's settings go to its csv."""
    rows = []
    for setting, seeds in wtd.TUNING_SEEDS.items():
        for spec in ('none', 'sa', *wtd.ROUNDS[1], *wtd.ROUNDS[2], *KD_CELLS, *DIST_CELLS, *LSKD_CELLS):
            for seed in seeds:
                top1 = value(setting, spec) + noise(seed, spec)
                if spec.partition('[')[0] in ('kd', 'dist') and setting in sa_decision.TUNING_SEEDS:
                    rows.append({'setting': setting, 'spec': spec, 'seed': seed, 'top1': top1})
                else:
                    write(cache, setting, spec, seed, top1)
    path = os.path.join(str(cache), 'second-search.csv')
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=['setting', 'spec', 'seed', 'top1'])
        writer.writeheader()
        writer.writerows(rows)
    monkeypatch.setattr(wtd, 'SECOND_SEARCH_TUNING', [path])


def test_tuned_baselines_come_from_the_second_searchs_runs_or_the_cache_pooled_where_untuned(tmp_path, monkeypatch):
    best = {'digits-homo': KD_CELLS[3], 'digits-hetero': KD_CELLS[3], 'textures-biased': KD_CELLS[0],
            'photos-weak': KD_CELLS[5], 'photos-worse': KD_CELLS[1]}
    lskd = {'digits-homo': LSKD_CELLS[2], 'digits-hetero': LSKD_CELLS[4], 'photos-worse': LSKD_CELLS[7]}
    fill_tuning(tmp_path, lambda s, spec: 91.0 if spec in (best.get(s), lskd.get(s)) else 90.0, monkeypatch)
    kd, ls = wtd.tuned(str(tmp_path), 'kd'), wtd.tuned(str(tmp_path), 'lskd')
    assert {s: kd[s] for s in best} == best and kd['shapes-homo'] == KD_CELLS[3]
    # LSKD: ties go to the first cell; pooled digits-homo and digits-hetero: LSKD_CELLS[2] and [4] tie, [2] first
    assert ls['textures-biased'] == LSKD_CELLS[0] and ls['photos-worse'] == LSKD_CELLS[7]
    assert ls['digits-mobile'] == ls['digits-weak'] == LSKD_CELLS[2]


def test_the_mechanism_is_the_best_worst_setting_gain_over_none_on_the_tuning_runs(tmp_path, monkeypatch):
    # M1 gains most on average but hurts on photos-worse; M2's worst setting is the best
    gain = {M1: {'photos-worse': -1.0}, M2: {'photos-worse': 0.5}, M3: {'photos-worse': 0.2}}
    fill_tuning(tmp_path, lambda s, spec: 90.0 + (spec != 'none') * gain.get(spec, {}).get(s, 2.0 if spec == M1 else 1.0),
                monkeypatch)
    mechanism, table = wtd.chosen_mechanism(str(tmp_path), wtd.ROUNDS[1])
    assert mechanism == M2
    assert any(line.startswith(f'| `{M1}` |') and '| -1.00 |' in line for line in table)
    # the second round chooses among its own candidates by the same criterion: the ramp's worst setting is the best
    ramp = 'sa[ramp_by=0.5]'
    worst = {spec: -3.0 for spec in wtd.ROUNDS[2]}
    worst[ramp] = -1.0
    fill_tuning(tmp_path, lambda s, spec: 90.0 + (spec != 'none') * (worst.get(spec, 0.0) if s == 'photos-worse'
                                                                       else 1.0), monkeypatch)
    mechanism, table = wtd.chosen_mechanism(str(tmp_path), wtd.ROUNDS[2])
    assert mechanism == ramp and len(table) == 2 + 1 + len(wtd.ROUNDS[2])


def fill_held_out(cache, value, curve=lambda s, spec, top1: None):
    for setting in wtd.SETTINGS:
        for spec in ('none', 'sa', M2, 'kd', 'dist', 'lskd'):
            for seed in wtd.HELD_OUT_SEEDS[1]:
                top1 = value(setting, spec) + noise(seed, spec)
                write(cache, setting, spec, seed, top1, curve(setting, spec, top1))


BASELINES = {b: {s: b for s in wtd.SETTINGS} for b in wtd.BASELINES}
HELD = {'none': 90.0, 'kd': 91.0, 'dist': 90.5, 'lskd': 91.2, 'sa': 92.0, M2: 92.0}


def rule_text(tmp_path, value, cost=1.08):
    fill_held_out(tmp_path, value)
    return '\n'.join(wtd.decide(str(tmp_path), M2, BASELINES, {'sa': 1.08, M2: cost}))


def test_the_mechanism_becomes_the_default_when_it_passes_all_four(tmp_path):
    # sa hurts on photos-worse, the mechanism does not, and it gains as much over the best baseline elsewhere
    text = rule_text(tmp_path, lambda s, spec: {('photos-worse', 'sa'): 88.0, ('photos-worse', M2): 91.5}.get(
        (s, spec), HELD[spec]))
    assert f'**Decision:** `{M2}` becomes the default' in text
    assert '**Below no distillation by more than one SE, with the defaults:** nowhere.' in text
    # the best tuned baseline of each setting is the best held-out mean of the three: LSKD here
    assert '| digits-homo | 95.0 | 90.00 | 92.00 | 92.00 | 91.00 | 90.50 | 91.20 (best) |' in text


@pytest.mark.parametrize('where, fails', [
    ({('photos-worse', M2): 89.5}, "(b) nowhere below none by more than one SE | fail: photos-worse"),
    ({('digits-homo', M2): 91.0}, "(a) nowhere below `sa` by more than one SE | fail: digits-homo"),
    ({('photos-worse', 'sa'): 93.0}, "(c) mean gain over the best tuned baseline at least `sa`'s | fail"),
])
def test_a_mechanism_failing_one_criterion_leaves_the_defaults(tmp_path, where, fails):
    text = rule_text(tmp_path, lambda s, spec: where.get((s, spec), HELD[spec]))
    assert fails in text and '**Decision:** `sa` stays the default' in text


def test_a_mechanism_over_the_flop_budget_is_refused_and_the_defaults_below_none_are_named(tmp_path):
    text = rule_text(tmp_path, lambda s, spec: {('photos-worse', 'sa'): 88.0}.get((s, spec), HELD[spec]), cost=1.2)
    assert "(d) at most 1.10x KD's FLOPs | fail" in text
    assert '**Below no distillation by more than one SE, with the defaults:** photos-worse (-2.00 ± 0.00)' in text


def test_time_to_tuned_kds_accuracy_is_read_from_the_mean_curves(tmp_path):
    def curve(setting, spec, top1):
        epochs = sa_search.SETTINGS[setting].epochs
        step = 2.0 if spec == 'sa' else 1.0  # SA's steps take twice KD's time here
        # sa reaches its final accuracy at the first point; the others climb linearly to theirs
        return [[e, top1 if spec == 'sa' else top1 - 5 + 5 * e / epochs, step * e] for e in range(5, epochs + 1, 5)]

    fill_held_out(tmp_path, lambda s, spec: HELD[spec], curve)
    lines = wtd.time_claim(str(tmp_path), M2, BASELINES, None)
    row = next(line for line in lines if line.startswith('| digits-homo |'))
    cells = [c.strip() for c in row.split('|')[1:-1]]
    assert cells[1] == '91.00'  # tuned KD's final mean
    assert cells[2] == 'epoch 5, 10.0 s; step 2.00x'  # sa: at once, at twice the step time
    assert cells[4] == 'epoch 60, 60.0 s; step 1.00x'  # tuned KD reaches its own final top-1 at the end
    assert cells[7] == 'never; step 1.00x'  # none ends at 90
