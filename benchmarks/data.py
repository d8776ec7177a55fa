"""Small real datasets that ship inside packages, written as timm ImageFolder trees (no download).

Distillation shows where the student is data-starved (docs/method.md#measuring-it-data-starved-students), so
every writer produces a fixed, seeded, stratified train/validation split and can cap the train split at N images
per class: the teacher trains on the full split, the student on the capped one, and both are scored on the same
validation split.

    root/train/<class>/<index>.png
    root/validation/<class>/<index>.png

* ``digits``: scikit-learn's 1,797 8x8 digits (10 classes), upsampled to ``size`` px RGB.
* ``lfw``: scikit-image's bundled LFW subset, 200 25x25 grayscale images, faces vs non-faces (2 classes).

scikit-learn (``digits`` and the split) and scikit-image (``lfw``) are imported lazily; install them with
``pip install timm-sadistill[demo]`` or ``[bench]``.
"""
import json
import os
import shutil
from typing import Callable, Dict, Optional, Tuple

import numpy as np
from PIL import Image

__all__ = ['CLASS_NAMES', 'DATASETS', 'list_datasets', 'load_arrays', 'write_image_folder']

MANIFEST = 'manifest.json'


def _require(module: str, package: str):
    """Import ``module`` or fail naming the pip extra that provides it."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{module} is needed for these datasets: pip install {package} (or timm-sadistill[demo] / [bench])."
        ) from e


# folder names of the classes, in label order (known without importing the packages that hold the data)
CLASS_NAMES: Dict[str, Tuple[str, ...]] = {'digits': tuple(str(d) for d in range(10)), 'lfw': ('face', 'nonface')}


def _digits() -> Tuple[np.ndarray, np.ndarray, Tuple[str, ...]]:
    datasets = _require('sklearn.datasets', 'scikit-learn')
    data = datasets.load_digits()
    images = data.images / 16.0  # 0..16 ink levels -> 0..1
    return images.astype(np.float32), data.target.astype(np.int64), CLASS_NAMES['digits']


def _lfw() -> Tuple[np.ndarray, np.ndarray, Tuple[str, ...]]:
    data = _require('skimage.data', 'scikit-image')
    images = data.lfw_subset()  # (200, 25, 25) float in [0, 1]: the first 100 are faces, the rest are not
    labels = np.repeat(np.array([0, 1], dtype=np.int64), 100)
    return images.astype(np.float32), labels, CLASS_NAMES['lfw']


# name -> loader of (images (N, H, W) in [0, 1], labels (N,), class names)
DATASETS: Dict[str, Callable[[], Tuple[np.ndarray, np.ndarray, Tuple[str, ...]]]] = {'digits': _digits, 'lfw': _lfw}


def list_datasets() -> Tuple[str, ...]:
    """Names accepted by `write_image_folder`."""
    return tuple(sorted(DATASETS))


def load_arrays(name: str) -> Tuple[np.ndarray, np.ndarray, Tuple[str, ...]]:
    """(images (N, H, W) float32 in [0, 1], labels (N,) int64, class names) of dataset ``name``."""
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset '{name}'; use one of {', '.join(list_datasets())}.")
    return DATASETS[name]()


def write_image_folder(
        name: str,
        root: str,
        size: int = 64,
        val_fraction: float = 0.3,
        train_per_class: Optional[int] = None,
        seed: int = 0,
) -> Dict[str, int]:
    """Write dataset ``name`` as an RGB ImageFolder under ``root`` and return the image count of each split.

    Args:
        name: 'digits' or 'lfw'.
        root: output folder; ``train/`` and ``validation/`` are created in it.
        size: side of the written square PNGs (bilinear upsampling of the small originals).
        val_fraction: share of each class held out for validation (stratified, seeded).
        train_per_class: keep only this many train images of each class (the first ones of a seeded shuffle);
            None keeps the whole train split. The validation split never depends on it.
        seed: split seed; the same seed gives the same validation images for every ``train_per_class``.

    An existing tree written with the same arguments (``manifest.json``) is reused as is.
    """
    model_selection = _require('sklearn.model_selection', 'scikit-learn')
    spec = dict(name=name, size=size, val_fraction=val_fraction, train_per_class=train_per_class, seed=seed)
    manifest_path = os.path.join(root, MANIFEST)
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        if manifest.get('spec') == spec:
            return manifest['counts']
        os.remove(manifest_path)  # first: a rewrite interrupted below must not pass for the old tree

    for split in ('train', 'validation'):  # a tree of other arguments: its images must not mix with these
        shutil.rmtree(os.path.join(root, split), ignore_errors=True)
    images, labels, classes = load_arrays(name)
    indices = np.arange(len(labels))
    train_idx, val_idx = model_selection.train_test_split(
        indices, test_size=val_fraction, stratify=labels, random_state=seed)
    if train_per_class is not None:
        # train_test_split already shuffled train_idx with the seed: the first N of each class are a seeded sample,
        # and the N-image split is a subset of the (N+1)-image one
        train_idx = np.concatenate([train_idx[labels[train_idx] == k][:train_per_class] for k in range(len(classes))])

    counts = {}
    for split, split_idx in (('train', train_idx), ('validation', val_idx)):
        for cls in classes:
            os.makedirs(os.path.join(root, split, cls), exist_ok=True)
        for i in split_idx:
            pixels = (np.clip(images[i], 0.0, 1.0) * 255).round().astype(np.uint8)
            image = Image.fromarray(pixels).resize((size, size), Image.BILINEAR).convert('RGB')
            image.save(os.path.join(root, split, classes[labels[i]], f'{i:05d}.png'))
        counts[split] = int(len(split_idx))
    # the manifest goes last: a tree interrupted while writing is rewritten next time
    with open(manifest_path, 'w') as f:
        json.dump({'spec': spec, 'counts': counts}, f, indent=1)
    return counts
