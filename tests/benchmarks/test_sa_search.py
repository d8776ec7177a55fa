"""benchmarks/sa_search.py: its data, its statistics, and a real (tiny) teacher + student run through it."""
import math
import os

import numpy as np
import pytest
import torch

import timm_sadistill as tsd
from benchmarks import sa_search


def test_shapes_dataset_is_seeded_balanced_and_the_class_lives_in_the_layout():
    images, labels = sa_search.shapes_arrays(n_per_class=6, seed=3)
    again, _ = sa_search.shapes_arrays(n_per_class=6, seed=3)
    assert images.shape == (60, 32, 32) and np.array_equal(images, again)
    assert np.bincount(labels).tolist() == [6] * 10
    assert images.min() >= 0 and images.max() <= 1
    # classes 0 and 1 share both shapes and differ only in where the second one sits (right of vs below): the
    # bright pixels spread along x for one and along y for the other
    def spread(image):
        ys, xs = np.nonzero(image > 0.6)
        return xs.var() - ys.var()

    assert all(spread(image) > 0 for image in images[labels == 0])
    assert all(spread(image) < 0 for image in images[labels == 1])


def test_textures_dataset_is_seeded_balanced_and_the_class_lives_in_the_orientation_spectrum():
    images, labels = sa_search.textures_arrays(n_per_class=4, noise=0.0, seed=3)
    again, _ = sa_search.textures_arrays(n_per_class=4, noise=0.0, seed=3)
    assert images.shape == (40, 32, 32) and np.array_equal(images, again)
    assert np.bincount(labels).tolist() == [4] * 10
    assert images.min() >= 0 and images.max() <= 1
    # class 0's gratings run along x (vertical stripes: change along x), class 5's too but at a higher frequency;
    # their spectra peak near (fy, fx) = (0, 4) and (0, 7)
    for label, freq in ((0, 4), (5, 7)):
        for image in images[labels == label]:
            power = np.abs(np.fft.rfft2(image - image.mean()))
            fy, fx = np.unravel_index(power.argmax(), power.shape)
            assert min(fy, 32 - fy) <= 2 and abs(fx - freq) <= 1  # the orientation jitter tilts it a little


def test_a_teacher_from_elsewhere_skips_the_students_images_and_a_label_bias_gives_the_next_class_r():
    labels = np.repeat(np.arange(10), 20)
    tr = np.arange(200)
    setting = sa_search.Setting('t', 'textures', 'test_resnet', 'test_resnet', per_class=6,
                                teacher_sees_student_images=False, teacher_per_class=10, teacher_label_bias=0.3)
    student = sa_search.take_per_class(tr, labels, 6)
    indices, taught, key = sa_search.teacher_train_set(setting, labels, tr)
    assert not set(indices) & set(student) and np.bincount(labels[indices]).tolist() == [10] * 10
    assert taught.shape == (100, 10) and torch.allclose(taught.sum(-1), torch.ones(100))
    rows = torch.arange(100)
    y = torch.from_numpy(labels[indices])
    assert torch.allclose(taught[rows, y], torch.full((100,), 0.7))
    assert torch.allclose(taught[rows, (y + 1) % 10], torch.full((100,), 0.3))
    assert key == 'textures-test_resnet-n10-e15-without6-bias0.3'
    plain = sa_search.teacher_train_set(sa_search.Setting('t', 'textures', 'test_resnet', 'test_resnet'), labels, tr)
    assert set(student) <= set(plain[0]) and np.array_equal(plain[1].numpy(), labels[plain[0]])
    assert plain[2] == 'textures-test_resnet-nall-e15'


def test_paired_stats_is_the_mean_and_standard_error_of_the_differences():
    a = {0: 90.0, 1: 92.0, 2: 91.0, 3: 95.0}
    b = {0: 89.0, 1: 92.5, 2: 89.0, 5: 10.0}  # seed 5 has no partner and is left out
    mean, se, wins, n = sa_search.paired_stats(a, b)
    diffs = np.array([1.0, -0.5, 2.0])
    assert n == 3 and wins == 2
    assert mean == pytest.approx(diffs.mean())
    assert se == pytest.approx(diffs.std(ddof=1) / math.sqrt(3))


def test_select_best_pools_the_settings_means_breaks_ties_by_list_order_and_refuses_missing_runs(tmp_path, capsys):
    import json
    top1 = {('digits-homo', 'a'): [90, 92], ('digits-hetero', 'a'): [80, 80],   # pooled 85.5
            ('digits-homo', 'b'): [95, 95], ('digits-hetero', 'b'): [70, 70],   # 82.5: best on one setting only
            ('digits-homo', 'c'): [91, 91], ('digits-hetero', 'c'): [80, 80]}   # 85.5: ties a, listed later
    for (setting, spec), values in top1.items():
        for seed, value in zip((100, 101), values):
            path = sa_search.run_path(str(tmp_path), sa_search.SETTINGS[setting], 30, sa_search.SETTINGS[setting].epochs,
                                      spec, seed)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, 'w') as f:
                json.dump({'top1': value}, f)
    settings = ['digits-homo', 'digits-hetero']
    assert sa_search.select_best(str(tmp_path), settings, ['a', 'b', 'c'], [100, 101], 30) == 'a'
    assert sa_search.select_best(str(tmp_path), settings, ['c', 'b', 'a'], [100, 101], 30) == 'c'
    with pytest.raises(SystemExit, match='1 of 2 seeds'):
        sa_search.select_best(str(tmp_path), settings, ['a'], [100, 102], 30)


def test_the_baseline_grids_are_the_second_searchs_and_lskd_has_as_many_cells_as_kd(tmp_path):
    import timm_sadistill as tsd
    from benchmarks import sa_decision
    grids = sa_search.BASELINE_GRIDS
    ran = sa_decision.tuning_specs()
    assert list(grids['kd']) == ran['kd'] and list(grids['dist']) == ran['dist']
    assert len(grids['lskd']) == len(grids['kd']) == 8 and len(set(grids['lskd'])) == 8
    for spec in grids['lskd']:
        name, options = tsd.parse_loss_spec(spec)
        assert name == 'lskd' and tsd.create_distill_loss(name, **options).option_values == options
    # the temperatures rise first, then the weight: the order ties are broken by
    assert [tsd.parse_loss_spec(spec)[1]['temperature'] for spec in grids['lskd']] == [1, 1, 2, 2, 3, 3, 4, 4]
    # a grid in --specs is its cells, and a tuning-specs.txt that lists LSKD's grid reads it as its own group
    expanded = sa_search.expand_specs('none;grid:lskd;sa')
    assert expanded.split(';') == ['none', *grids['lskd'], 'sa']
    (tmp_path / 'specs.txt').write_text(sa_search.expand_specs('none;grid:kd;grid:lskd;sa'))
    assert sa_decision.tuning_specs(str(tmp_path / 'specs.txt'))['lskd'] == list(grids['lskd'])
    with pytest.raises(SystemExit, match="unknown grid 'grid:kdd'; the grids are kd, dist, lskd"):
        sa_search.expand_specs('grid:kdd')


@pytest.mark.slow
def test_a_student_run_trains_through_the_task_on_banked_teacher_outputs(tmp_path, monkeypatch):
    tiny = sa_search.Setting('tiny', 'digits', 'test_resnet', 'test_resnet', per_class=2, teacher_per_class=4,
                             teacher_epochs=1, epochs=2, batch_size=8)
    monkeypatch.setitem(sa_search.SETTINGS, 'tiny', tiny)
    created = []  # every model the runs create; each run's student is the last one it creates
    create_model = sa_search.timm.create_model

    def recording_create_model(*args, **kwargs):
        created.append(create_model(*args, **kwargs))
        return created[-1]

    monkeypatch.setattr(sa_search.timm, 'create_model', recording_create_model)
    cache = str(tmp_path)
    none = sa_search.cached_run('tiny', 'none', 0, cache, views=2, epochs=None)
    none_student = created[-1]
    sa = sa_search.cached_run('tiny', 'sa[cam_weight=1]', 0, cache, views=2, epochs=None)
    sa_student = created[-1]
    bank = sa_search.bank_for(tiny, cache, 2)

    @torch.no_grad()
    def top1(model):  # the test's own count of correct validation predictions, in percent
        return 100.0 * (model.eval()(bank.x_val).argmax(-1) == bank.y_val).sum().item() / len(bank.y_val)

    # the reported accuracies are those of the trained students and the teacher on the validation split
    assert len(bank.y_val) == 540 and sa_student is not none_student
    assert none['top1'] == pytest.approx(top1(none_student)) and sa['top1'] == pytest.approx(top1(sa_student))
    assert none['teacher_top1'] == sa['teacher_top1'] == pytest.approx(top1(bank.teacher))  # one cached teacher
    assert bank.views.shape == (2, 20, 3, 64, 64) and bank.logits.shape == (2, 20, 10)
    # the banked outputs are the teacher's on those views, as a live teacher would give them
    with torch.no_grad():
        torch.testing.assert_close(bank.teacher(bank.views[1]), bank.logits[1])
    # a cached run is read back, not retrained
    assert sa_search.cached_run('tiny', 'sa[cam_weight=1]', 0, cache, views=2, epochs=None) == sa


def test_a_run_spec_may_hold_the_benchmarks_own_schedules_beside_the_loss_options():
    assert sa_search.parse_run_spec('sa[fade_by=0.5]') == ('sa', {'fade_by': 0.5})
    assert sa_search.parse_run_spec('sa[fade_by=1.0,gate=while_ahead]') == \
        sa_search.parse_run_spec('sa[gate=while_ahead,fade_by=1.0]') == ('sa', {'gate': 'while_ahead', 'fade_by': 1.0})
    assert sa_search.parse_run_spec('kd[temperature=2.0]') == tsd.parse_loss_spec('kd[temperature=2.0]')
    assert sa_search.parse_run_spec('sa[ramp_by=0.5,fade_by=1.0]') == ('sa', {'ramp_by': 0.5, 'fade_by': 1.0})
    # a fade by half the run, a ramp over half of it, and both: the factor of the distill weight
    done = [0.0, 0.25, 0.5, 0.75]
    assert [sa_search.schedule_factor(d, 0.5, None) for d in done] == [1.0, 0.5, 0.0, 0.0]
    assert [sa_search.schedule_factor(d, None, 0.5) for d in done] == [0.0, 0.5, 1.0, 1.0]
    assert [sa_search.schedule_factor(d, 1.0, 0.5) for d in done] == [0.0, 0.375, 0.5, 0.25]
    assert sa_search.gate_summary({'top1': 50.0}) == {}
    assert sa_search.gate_summary({'gate_open': [1.0, 0.6, 0.4, 1.0, 0.0]}) == {'gate_on': 0.6, 'gate_off_from': 3}
    assert sa_search.gate_summary({'gate_open': [1.0, 1.0]}) == {'gate_on': 1.0, 'gate_off_from': ''}


@pytest.mark.slow
def test_a_fade_takes_the_distill_weight_linearly_to_zero_and_a_gate_is_recorded_per_epoch(tmp_path, monkeypatch):
    tiny = sa_search.Setting('tiny', 'digits', 'test_resnet', 'test_resnet', per_class=2, teacher_per_class=4,
                             teacher_epochs=1, epochs=2, batch_size=8)
    monkeypatch.setitem(sa_search.SETTINGS, 'tiny', tiny)
    weights = []  # the distill weight of each step's loss
    create_task = tsd.create_distill_task

    def recording_create_task(*args, **kwargs):
        task = create_task(*args, **kwargs)
        combine = task.combine
        task.combine = lambda *a: (weights.append(task.distill_loss_weight), combine(*a))[1]
        return task

    monkeypatch.setattr(sa_search.tsd, 'create_distill_task', recording_create_task)
    sa_search.cached_run('tiny', 'kd[distill_loss_weight=2.0,fade_by=0.5]', 0, str(tmp_path), views=2, epochs=None)
    steps = 2 * 3  # 20 images in batches of 8, two epochs
    assert weights == pytest.approx([2.0 * max(0.0, 1 - (s / steps) / 0.5) for s in range(steps)])
    gated = sa_search.cached_run('tiny', 'sa[gate=until_caught_up]', 0, str(tmp_path), views=2, epochs=None)
    assert len(gated['gate_open']) == 2 and all(0 <= share <= 1 for share in gated['gate_open'])
    assert 'gate_open' not in sa_search.cached_run('tiny', 'kd', 0, str(tmp_path), views=2, epochs=None)
