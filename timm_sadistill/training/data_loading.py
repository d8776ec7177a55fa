"""Data for a training run: timm's datasets and loaders as train.py builds them, behind checks of the data
folder that stop with the path to fix, before anything is written.

The checks read the listing timm's folder reader makes anyway (plus the top level of each split folder), so they add
no walk of the tree: a missing validation folder (timm would evaluate on the training images) or train folder
(timm would train on the validation images too), class folders that differ between the splits or hold subfolders
(the class indices would shift), an empty class folder, a class folder a ``--class-map`` leaves out (timm would
drop its images), a class map naming a class twice or holding a blank line, a stray file in a split folder, no
images at all, fewer train images than one batch. What is hidden (a name starting with a dot: ``.ipynb_checkpoints/``)
is skipped with one line, not made a class. ``--check-images`` decodes a few images per class before anything is written
(``all``: every image); every image is decoded when it is read, and an undecodable one stops the run with its path
(timm's dataset would skip it).
"""
import argparse
import logging
import os
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from timm.data import FastCollateMixup, ImageDataset, Mixup, create_dataset, create_loader
from timm.data.readers.img_extensions import get_img_extensions
from timm.data.readers.reader_image_folder import ReaderImageFolder
from timm.utils.misc import natural_key
from torch.utils.data import Dataset

from ..errors import UsageError
from .image_decode import check_decodes, fail_on_unreadable

__all__ = ['create_datasets', 'create_loaders']

_logger = logging.getLogger(__name__)


def _create_dataset(args: argparse.Namespace, split: str, **kwargs) -> Dataset:
    """timm's ``create_dataset``, with a folder that holds no image refused as the user's error (timm raises a bare
    RuntimeError)."""
    try:
        return create_dataset(args.dataset, root=args.data_dir, split=split, **kwargs)
    except RuntimeError:
        if args.dataset:
            raise
        root = os.path.join(args.data_dir, split)
        root = root if os.path.isdir(root) else args.data_dir  # timm's fallback when the split has no folder
        image_exts = get_img_extensions(as_set=True)
        if any(os.path.splitext(name)[1].lower() in image_exts for _, _, names in os.walk(root) for name in names):
            raise  # not an empty folder: the failure is not the one explained here
        expected = os.path.join(args.data_dir, split, '<class>', '<image>')
        raise UsageError(f"No images found under '{root}'; expected {expected} files "
                         f"({', '.join(sorted(image_exts))}).") from None


def _skip_hidden(reader: ReaderImageFolder, class_map: str) -> None:
    """Drop from timm's listing (in place) the images under a folder or file whose name starts with a dot
    (``.ipynb_checkpoints/``, ``.git/``, macOS's ``._x.jpg``), which timm's reader would make classes of, and
    number the remaining classes again as timm does; one line names what was skipped.

    With a class map the map numbers the classes, so only the images go.
    """
    prefix = len(os.path.join(reader.root, ''))

    def hidden(path: str) -> str:
        """The part of ``path`` below the root up to its first hidden name, or ''."""
        below = path[prefix:]
        if not below.startswith('.') and os.sep + '.' not in below:  # nearly every path: no split needed
            return ''
        parts = below.split(os.sep)
        first = next(i for i, part in enumerate(parts) if part.startswith('.'))
        return '/'.join(parts[:first + 1])

    marks = [hidden(path) for path, _ in reader.samples]
    skipped = sorted(set(marks) - {''})
    if not skipped:
        return
    index_to_class = {index: name for name, index in reader.class_to_idx.items()}
    samples = [(path, index_to_class[target]) for (path, target), mark in zip(reader.samples, marks) if not mark]
    if not class_map:  # timm's own numbering: the sorted names of the folders that hold images
        names = sorted({name for _, name in samples}, key=natural_key)
        reader.class_to_idx = {name: index for index, name in enumerate(names)}
    reader.samples = [(path, reader.class_to_idx[name]) for path, name in samples]
    _logger.warning(f"Skipping what is hidden in '{reader.root}' (a name starting with a dot is not data): "
                    f"{', '.join(skipped)}.")


def _check_class_map(class_map: str) -> None:
    """A ``--class-map`` text file (its existence is `check_train_flags`'s) names each class once, one a line, none
    blank: timm's reader would number a duplicate twice (leaving an index no folder has) and make a class of a blank
    line."""
    if not class_map.lower().endswith('.txt'):
        return  # timm's pickled maps are dicts: a name cannot repeat
    seen: Dict[str, int] = {}
    with open(class_map, encoding='utf-8') as f:
        for number, line in enumerate(f, 1):
            name = line.strip()
            if not name:
                raise UsageError(f"--class-map '{class_map}': line {number} is blank; write one class folder name a "
                                 "line, with no blank lines.")
            if name in seen:
                raise UsageError(f"--class-map '{class_map}': line {number} names '{name}' again (first on line "
                                 f"{seen[name]}); name each class once.")
            seen[name] = number


def _check_split_folder(reader: ReaderImageFolder, class_map: str) -> None:
    """The split folder holds class folders only, each with images directly inside, from timm's listing.

    timm's reader names a class by the folder an image lies in, so an image in a subfolder of a class folder makes a
    class of the subfolder, and a class folder without images makes no class: either shifts the class indices. A
    stray file beside the class folders is a sign of a wrong ``--data-dir`` or ``--train-split``.
    """
    root = reader.root
    with os.scandir(root) as scan:
        entries = sorted((e for e in scan if not e.name.startswith('.')), key=lambda e: e.name)
    for entry in entries:
        if not entry.is_dir():
            raise UsageError(f"'{entry.path}' lies directly in the split folder '{root}', where only class folders "
                             "belong; move it out of the data folder.")
    prefix = len(os.path.join(root, ''))
    classes = set()
    for path, _ in reader.samples:
        class_name, _, name = path[prefix:].partition(os.sep)
        if os.sep in name:
            raise UsageError(f"'{path}' lies in a subfolder of class folder '{os.path.join(root, class_name)}', which "
                             "timm would make a class of its own; move the images up into the class folder.")
        classes.add(class_name)
    for entry in entries:
        if class_map and entry.name not in reader.class_to_idx:  # timm would drop its images without a word
            raise UsageError(f"Class folder '{entry.path}' is not in --class-map '{class_map}'; add its name to the "
                             "map, or move the folder out of the data folder.")
        if entry.name not in classes:
            raise UsageError(f"Class folder '{entry.path}' has no images ({', '.join(sorted(get_img_extensions()))}); "
                             "add images or remove the folder.")


def _check_same_classes(train: ReaderImageFolder, val: ReaderImageFolder) -> None:
    """Both splits have the same classes (timm numbers each split's class folders on its own)."""
    if train.class_to_idx != val.class_to_idx:
        missing = sorted(set(train.class_to_idx) - set(val.class_to_idx))
        extra = sorted(set(val.class_to_idx) - set(train.class_to_idx))
        raise UsageError(
            f"The class folders of '{val.root}' differ from those of '{train.root}' "
            f"(missing: {', '.join(missing) or '-'}; extra: {', '.join(extra) or '-'}), so the class indices of the "
            "splits would not match; give both splits the same class folders.")


def _decode_sample(dataset: ImageDataset, per_class: Union[int, str], rank: int, world_size: int) -> None:
    """Decode ``per_class`` images of each class, evenly spread over its files (or every image for ``all``); each
    rank decodes its share."""
    if per_class == 'all':
        indices: List[int] = list(range(len(dataset)))
    else:
        by_class: Dict[int, List[int]] = {}
        for index, (_, target) in enumerate(dataset.reader.samples):
            by_class.setdefault(target, []).append(index)
        indices = [group[j * len(group) // per_class] for group in by_class.values()
                   for j in range(min(per_class, len(group)))]
    for index in indices[rank::world_size]:
        check_decodes(dataset, index)


def create_datasets(args: argparse.Namespace, in_chans: int = 3) -> Tuple[Dataset, Optional[Dataset]]:
    """(train, eval or None) datasets of ``--dataset``/``--data-dir`` with images of ``in_chans`` channels (RGB or
    grayscale), checked (see the module docstring); they need no model, so their classes can set its head."""
    if args.data and not args.data_dir:
        args.data_dir = args.data
    if not args.dataset:  # ImageFolder/ImageTar: a local path that must exist
        if not args.data_dir:
            raise UsageError("No data: pass --data-dir DIR (an ImageFolder with train/ and validation/ folders).")
        if not os.path.exists(args.data_dir):
            raise UsageError(f"Data folder '{args.data_dir}' does not exist; pass an existing --data-dir.")
    if args.class_map:
        _check_class_map(args.class_map)
    input_img_mode = 'RGB' if in_chans == 3 else 'L'
    common = dict(class_map=args.class_map, batch_size=args.batch_size, input_img_mode=input_img_mode)
    dataset_eval = None
    if args.val_split:  # first: without its folder timm lists the whole data folder, refused before a second listing
        dataset_eval = _create_dataset(args, args.val_split, is_training=False, **common)
        reader = getattr(dataset_eval, 'reader', None)
        if isinstance(reader, ReaderImageFolder) and os.path.samefile(reader.root, args.data_dir):
            raise UsageError(
                f"No validation folder '{os.path.join(args.data_dir, args.val_split)}' (nor one of timm's other names "
                "for it), so timm would evaluate on the training images; add it, name yours with --val-split NAME, "
                "or pass --val-split '' to train without validation.")
    dataset_train = _create_dataset(args, args.train_split, is_training=True, seed=args.seed, **common)
    datasets = [d for d in (dataset_train, dataset_eval) if d is not None]
    folders = [d.reader for d in datasets if isinstance(getattr(d, 'reader', None), ReaderImageFolder)]
    if len(folders) == 2 and os.path.samefile(folders[0].root, args.data_dir):
        raise UsageError(
            f"No train folder '{os.path.join(args.data_dir, args.train_split)}' (nor one of timm's other names for "
            f"it), so timm would train on every image under '{args.data_dir}', the validation images included; add it "
            "or name yours with --train-split NAME.")
    for reader in folders:
        _skip_hidden(reader, args.class_map)
        _check_split_folder(reader, args.class_map)
    if len(folders) == 2:
        _check_same_classes(*folders)
    if type(dataset_train) is ImageDataset and len(dataset_train) < args.batch_size * args.world_size:
        raise UsageError(  # timm's train loader drops the last incomplete batch
            f"The train split of '{args.data_dir}' has {len(dataset_train)} images, fewer than one batch of "
            f"{args.batch_size} x {args.world_size} process(es), so training would take no step; "
            "lower -b or add images.")
    for dataset in datasets:
        if type(dataset) is ImageDataset:  # timm's map-style dataset (folder, tar): it would skip unreadable files
            if isinstance(dataset.reader, ReaderImageFolder) and args.check_images:
                _decode_sample(dataset, args.check_images, args.rank, args.world_size)
            fail_on_unreadable(dataset)
    return dataset_train, dataset_eval


def create_loaders(
        args: argparse.Namespace,
        data_config: Dict[str, Any],
        dataset_train: Dataset,
        dataset_eval: Optional[Dataset],
        device: torch.device,
) -> Tuple[Any, Optional[Any], Optional[Mixup], bool]:
    """(train loader, eval loader or None, mixup_fn, mixup_active): the loaders as timm's train.py builds them
    (prefetcher, mixup collate, distributed samplers); ``mixup_fn`` is the batch-side mixup when there is no prefetcher."""
    common = dict(mean=data_config['mean'], std=data_config['std'], pin_memory=args.pin_mem, device=device,
                  distributed=args.distributed, use_prefetcher=args.prefetcher)
    mixup_fn = None
    collate_fn = None
    mixup_active = args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None
    if mixup_active:
        mixup_args = dict(
            mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax, prob=args.mixup_prob,
            switch_prob=args.mixup_switch_prob, mode=args.mixup_mode, label_smoothing=args.smoothing,
            num_classes=args.num_classes,
        )
        if args.prefetcher:
            collate_fn = FastCollateMixup(**mixup_args)
        else:
            mixup_fn = Mixup(**mixup_args)
    train_interpolation = args.train_interpolation
    if args.no_aug or not train_interpolation:
        train_interpolation = data_config['interpolation']
    loader_train = create_loader(
        dataset_train, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=True,
        no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, scale=args.scale,
        ratio=args.ratio, hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter, auto_augment=args.aa,
        interpolation=train_interpolation, num_workers=args.workers, worker_seeding=args.worker_seeding,
        persistent_workers=False,  # workers seeded afresh each epoch, so that a resumed run draws the same (seed_epoch)
        collate_fn=collate_fn, **common,
    )
    loader_eval = None
    if dataset_eval is not None:
        loader_eval = create_loader(
            dataset_eval, input_size=data_config['input_size'],
            batch_size=args.validation_batch_size or args.batch_size, is_training=False,
            interpolation=data_config['interpolation'], num_workers=args.workers, crop_pct=data_config['crop_pct'],
            **common,
        )
    return loader_train, loader_eval, mixup_fn, mixup_active
