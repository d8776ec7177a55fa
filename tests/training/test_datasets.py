"""The data writers (benchmarks.data) and a smoke run of benchmarks/accuracy.py through the real CLI."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from benchmarks.data import CLASS_NAMES, write_image_folder

pytest.importorskip('sklearn')
ROOT = Path(__file__).resolve().parents[2]


def _count(root: Path, split: str) -> dict:
    return {cls.name: len(list(cls.glob('*.png'))) for cls in sorted((root / split).iterdir())}


def test_digits_full_and_starved_splits(tmp_path):
    full = write_image_folder('digits', str(tmp_path / 'full'), size=32)
    starved = write_image_folder('digits', str(tmp_path / 'n3'), size=32, train_per_class=3)
    assert full == {'train': 1257, 'validation': 540}  # 1,797 images, 30% held out
    assert starved == {'train': 30, 'validation': 540}
    assert set(_count(tmp_path / 'full', 'train')) == set(CLASS_NAMES['digits'])
    assert _count(tmp_path / 'n3', 'train') == {c: 3 for c in CLASS_NAMES['digits']}
    # the validation split does not depend on the train cap, and the starved train split is part of the full one
    assert sorted(p.name for p in (tmp_path / 'full' / 'validation').rglob('*.png')) == \
        sorted(p.name for p in (tmp_path / 'n3' / 'validation').rglob('*.png'))
    assert {p.name for p in (tmp_path / 'n3' / 'train').rglob('*.png')} <= \
        {p.name for p in (tmp_path / 'full' / 'train').rglob('*.png')}
    with Image.open(next((tmp_path / 'n3' / 'train' / '7').glob('*.png'))) as image:
        assert image.size == (32, 32) and image.mode == 'RGB'


def test_lfw_faces_vs_nonfaces(tmp_path):
    pytest.importorskip('skimage')
    counts = write_image_folder('lfw', str(tmp_path), size=48, train_per_class=5)
    assert counts == {'train': 10, 'validation': 60}
    assert _count(tmp_path, 'validation') == {'face': 30, 'nonface': 30}  # stratified
    with Image.open(next((tmp_path / 'train' / 'face').glob('*.png'))) as image:
        assert image.size == (48, 48) and image.mode == 'RGB'


def test_rewrite_is_cached_and_other_arguments_replace_the_tree(tmp_path):
    write_image_folder('digits', str(tmp_path), size=16, train_per_class=2)
    marker = tmp_path / 'train' / '0' / 'marker.png'
    marker.touch()
    write_image_folder('digits', str(tmp_path), size=16, train_per_class=2)  # same arguments: left as is
    assert marker.exists()
    assert write_image_folder('digits', str(tmp_path), size=16, train_per_class=1)['train'] == 10
    assert not marker.exists() and _count(tmp_path, 'train') == {c: 1 for c in CLASS_NAMES['digits']}


def test_unknown_dataset(tmp_path):
    with pytest.raises(ValueError, match='digits'):
        write_image_folder('mnist', str(tmp_path))


def _validation_top1(weights: Path, model_name: str, data_dir: Path) -> float:
    """The test's own top-1 (percent) of ``weights`` on ``data_dir/validation``, through timm's eval transform."""
    import timm
    import torch
    from safetensors.torch import load_file
    from timm.data import create_dataset, create_transform, resolve_data_config

    dataset = create_dataset('', root=str(data_dir), split='validation')
    model = timm.create_model(model_name, num_classes=len(dataset.reader.class_to_idx))
    model.load_state_dict(load_file(str(weights)))
    dataset.transform = create_transform(**resolve_data_config({'img_size': 64}, model=model))
    images, labels = zip(*dataset)
    with torch.no_grad():
        predictions = model.eval()(torch.stack(images)).argmax(-1)
    return 100.0 * (predictions == torch.tensor(labels)).sum().item() / len(labels)


@pytest.mark.slow
def test_accuracy_benchmark_smoke(tmp_path):
    """One seed, one epoch, two methods on lfw (the smallest dataset), through the real training command."""
    pytest.importorskip('skimage')
    pytest.importorskip('matplotlib')
    env = dict(os.environ, HF_HUB_OFFLINE='1', PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''))
    proc = subprocess.run(
        [sys.executable, str(ROOT / 'benchmarks' / 'accuracy.py'), '--datasets', 'lfw', '--pairs', 'homo',
         '--methods', 'none,sa', '--seeds', '0', '--epochs', '1', '--cache', str(tmp_path / 'cache'),
         '--results', str(tmp_path / 'results')],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    with open(tmp_path / 'results' / 'accuracy.csv') as f:
        rows = list(csv.DictReader(f))
    assert sorted(r['method'] for r in rows) == ['none', 'sa']
    assert all(r['epochs'] == '1' for r in rows)
    # each reported top-1 is that of the run's exported student (its one epoch) on the 60 validation images
    results = [json.loads(p.read_text()) for p in (tmp_path / 'cache' / 'runs').rglob('seed0.json')]
    assert sorted(r['method'] for r in results) == ['none', 'sa']
    for result in results:
        flags = result['command'].split()
        model, data_dir = flags[flags.index('--model') + 1], Path(flags[flags.index('--data-dir') + 1])
        top1 = _validation_top1(Path(result['output_dir']) / 'model.safetensors', model, data_dir)
        assert float(next(r for r in rows if r['method'] == result['method'])['top1_final']) == pytest.approx(top1)
    assert '| sa |' in (tmp_path / 'results' / 'accuracy.md').read_text()
    assert (tmp_path / 'results' / 'accuracy.png').stat().st_size > 0
