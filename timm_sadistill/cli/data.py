"""Data for ``timm-sadistill train``: timm's datasets and loaders as train.py builds them, behind checks that stop
on a missing folder, an empty or stray-file class folder, or an undecodable image, with the path to fix.
"""
import argparse
import os
from typing import Any, Dict, Optional, Tuple

import torch
from PIL import Image, UnidentifiedImageError
from timm.data import FastCollateMixup, Mixup, create_dataset, create_loader
from timm.data.readers.img_extensions import get_img_extensions
from torch.utils.data import Dataset

from .errors import UsageError

__all__ = ['create_datasets', 'create_loaders']


def _check_images(dataset, rank: int, world_size: int) -> None:
    """Open the header of every image file (each rank a shard), so an undecodable file stops the run with its name
    instead of being skipped with a warning deep inside a worker (timm's dataset skips unreadable samples)."""
    filenames = getattr(dataset, 'filenames', None)
    if filenames is None:
        return
    for path in filenames(absolute=True)[rank::world_size]:
        if not os.path.isfile(path):  # not a folder dataset (tar, hub, ...): nothing to check here
            return
        try:
            with Image.open(path) as image:
                image.size  # the header is parsed on open; this keeps the check explicit
        except (UnidentifiedImageError, OSError) as e:
            raise UsageError(f"Cannot decode image '{path}' ({type(e).__name__}); remove or replace the file.") from e


def _check_class_folders(split_root: str) -> None:
    """Each class folder holds at least one image and nothing that is not one (hidden files aside).

    timm's folder reader derives the classes from the files it finds, so an empty class folder silently shifts the
    class indices and a stray file is silently ignored; both deserve a stop with the path instead.
    """
    image_exts = get_img_extensions(as_set=True)
    for class_name in sorted(os.listdir(split_root)):
        class_dir = os.path.join(split_root, class_name)
        if not os.path.isdir(class_dir):
            continue
        images = 0
        for dirpath, _, filenames in os.walk(class_dir):
            for name in filenames:
                if name.startswith('.'):
                    continue
                if os.path.splitext(name)[1].lower() not in image_exts:
                    raise UsageError(f"'{os.path.join(dirpath, name)}' is not an image ({', '.join(sorted(image_exts))}); "
                                     "move it out of the data folder.")
                images += 1
        if not images:
            raise UsageError(f"Class folder '{class_dir}' has no images; add images or remove the folder.")


def create_datasets(args: argparse.Namespace, data_config: Dict[str, Any]) -> Tuple[Dataset, Optional[Dataset]]:
    """(train, eval or None) datasets of ``--dataset``/``--data-dir``, checked: every class folder holds images and
    only images, and every image decodes."""
    if args.data and not args.data_dir:
        args.data_dir = args.data
    if not args.dataset:  # ImageFolder/ImageTar: a local path that must exist
        if not args.data_dir:
            raise UsageError("No data: pass --data-dir DIR (an ImageFolder with train/ and validation/ folders).")
        if not os.path.exists(args.data_dir):
            raise UsageError(f"Data folder '{args.data_dir}' does not exist; pass an existing --data-dir.")
        for split in filter(None, (args.train_split, args.val_split)):
            split_root = os.path.join(args.data_dir, split)
            if os.path.isdir(split_root):
                _check_class_folders(split_root)
    input_img_mode = 'RGB' if data_config['input_size'][0] == 3 else 'L'
    common = dict(root=args.data_dir, class_map=args.class_map, batch_size=args.batch_size, input_img_mode=input_img_mode)
    dataset_train = create_dataset(args.dataset, split=args.train_split, is_training=True, seed=args.seed, **common)
    dataset_eval = create_dataset(args.dataset, split=args.val_split, is_training=False, **common) if args.val_split else None
    for dataset in (dataset_train, dataset_eval):
        if dataset is not None:
            if len(dataset) == 0:
                raise UsageError(f"No images found under '{args.data_dir}'; expected <split>/<class>/<image> files.")
            _check_images(dataset, args.rank, args.world_size)
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
