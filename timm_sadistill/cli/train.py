"""``timm-sadistill train``: timm's training recipe (flag names and meanings of timm's train.py) with our tasks.

``--distill none`` trains a plain model with timm's ClassificationTask (that is how teachers are trained);
``--distill sa|kd|at|fitnet|cwd|dkd`` builds ``create_distill_task(...)`` with a frozen teacher loaded from
``--teacher-checkpoint`` (or the hub with ``--teacher-pretrained``). The output folder is timm's:
``<output>/<experiment>/`` with args.yaml, summary.csv, last.pth.tar, model_best.pth.tar (readable by
``timm.task.resume_task_checkpoint``) and model.safetensors (the student at its best epoch, loadable with
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=..., num_classes=N), num_classes=N)``).

Distributed: ``torchrun --standalone --nproc_per_node=N -m timm_sadistill train ...``; only rank 0 writes files.

Test-only hooks (never set them outside tests):
    ``TSD_TEST_DUMP_PARAMS=<dir>``: every rank writes its final student state to ``<dir>/rank<k>.safetensors``.
    ``TSD_TEST_PAUSE_IN_SAVE=<seconds>``: see `timm_sadistill.cli.atomic_save`.
"""
import argparse
import logging
import os
import sys
import time
from collections import OrderedDict
from contextlib import suppress
from datetime import datetime
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import yaml
from PIL import Image, UnidentifiedImageError
from timm import utils
from timm.data import Mixup, FastCollateMixup, create_dataset, create_loader, resolve_data_config
from timm.data.readers.img_extensions import get_img_extensions
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import create_model, is_model, safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.task import ClassificationTask, TrainingTask, load_task_ema_checkpoint, resume_task_checkpoint
from timm.utils import NativeScaler, get_state_dict, unwrap_model

from .._checkpoint_checks import check_checkpoint_readable
from ..losses import list_distill_losses, loss_options
from ..tasks import NonFiniteLossError, create_distill_task, describe_nonfinite
from .atomic_save import AtomicCheckpointSaver, save_safetensors_atomic
from ..losses.sa import SA_OPTIONS
from ._common import add_sa_arguments, add_stage_arguments, sa_flag, sa_options
from .errors import UsageError
from .progress import ProgressBar

__all__ = [
    'add_distill_arguments', 'build_parser', 'parse_args', 'distill_task_kwargs',
    'loss_accepts', 'train', 'main',
]

_logger = logging.getLogger('timm_sadistill.train')

DUMP_PARAMS_ENV = 'TSD_TEST_DUMP_PARAMS'

# ----------------------------------------------------------------------------------------------------------------
# Arguments


def add_distill_arguments(parser: argparse.ArgumentParser, include_timm_kd_flags: bool = True) -> None:
    """The distillation flags, defined once for ``train`` and ``timm-train``.

    ``include_timm_kd_flags`` adds the flags timm's own train.py already has (``--kd-model-name`` alias
    ``--teacher``, ``--distill-loss-weight``, ``--task-loss-weight``, ``--kd-temperature``); ``timm-train`` leaves
    them out so they reach the user's train.py untouched.
    """
    group = parser.add_argument_group('Distillation parameters (timm-sadistill)')
    group.add_argument('--distill', default='none', choices=['none'] + list_distill_losses(),
                       help='Distillation method; "none" trains a plain model (default: none)')
    if include_timm_kd_flags:
        group.add_argument('--teacher', '--kd-model-name', dest='teacher', default=None, metavar='MODEL',
                           help='Teacher model name (timm); its weights come from --teacher-checkpoint')
        group.add_argument('--distill-loss-weight', default=None, type=float,
                           help='Weight of the distillation loss (timm rules: alone, task weight stays 1)')
        group.add_argument('--task-loss-weight', default=None, type=float,
                           help='Weight of the task loss (alone: distill weight = 1 - task weight)')
        group.add_argument('--kd-temperature', default=None, type=float,
                           help="Logit temperature for methods that have one (default: the method's own, 4.0)")
    group.add_argument('--teacher-checkpoint', default=None, metavar='FILE',
                       help='Teacher weights: .safetensors or timm .pth/.pth.tar (e.g. a teacher run\'s model.safetensors)')
    group.add_argument('--teacher-pretrained', action='store_true', default=False,
                       help='Download the teacher weights from the hub (only with this flag does anything download)')
    add_stage_arguments(group)
    add_sa_arguments(group)


def _add_timm_arguments(parser: argparse.ArgumentParser) -> None:
    """The subset of timm train.py's flags this command supports, with timm's names, defaults and meanings."""
    group = parser.add_argument_group('Dataset parameters')
    parser.add_argument('data', nargs='?', metavar='DIR', const=None,
                        help='path to dataset (positional is *deprecated*, use --data-dir)')
    group.add_argument('--data-dir', metavar='DIR', help='path to dataset (root dir)')
    group.add_argument('--dataset', metavar='NAME', default='',
                       help='dataset type + name ("<type>/<name>") (default: ImageFolder or ImageTar if empty)')
    group.add_argument('--train-split', metavar='NAME', default='train', help='dataset train split (default: train)')
    group.add_argument('--val-split', metavar='NAME', default='validation',
                       help='dataset validation split (default: validation)')
    group.add_argument('--class-map', default='', type=str, metavar='FILENAME',
                       help='path to class to idx mapping file (default: "")')

    group = parser.add_argument_group('Model parameters')
    group.add_argument('--model', default='resnet50', type=str, metavar='MODEL',
                       help='Name of model to train (default: "resnet50")')
    group.add_argument('--pretrained', action='store_true', default=False,
                       help='Start with pretrained version of specified network (if avail)')
    group.add_argument('--initial-checkpoint', default='', type=str, metavar='PATH',
                       help='Load this checkpoint into model after initialization (default: none)')
    group.add_argument('--resume', default='', type=str, metavar='PATH',
                       help='Resume full model and optimizer state from checkpoint (default: none)')
    group.add_argument('--no-resume-opt', action='store_true', default=False,
                       help='prevent resume of optimizer state when resuming model')
    group.add_argument('--num-classes', type=int, default=None, metavar='N',
                       help='number of label classes (Model default if None)')
    group.add_argument('--img-size', type=int, default=None, metavar='N',
                       help='Image size (default: None => model default)')
    group.add_argument('--in-chans', type=int, default=None, metavar='N',
                       help='Image input channels (default: None => 3)')
    group.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N',
                       help='Input all image dimensions (d h w, e.g. --input-size 3 224 224), uses model default if empty')
    group.add_argument('--crop-pct', default=None, type=float, metavar='N',
                       help='Input image center crop percent (for validation only)')
    group.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN',
                       help='Override mean pixel value of dataset')
    group.add_argument('--std', type=float, nargs='+', default=None, metavar='STD',
                       help='Override std deviation of dataset')
    group.add_argument('--interpolation', default='', type=str, metavar='NAME',
                       help='Image resize interpolation type (overrides model)')
    group.add_argument('-b', '--batch-size', type=int, default=128, metavar='N',
                       help='Input batch size for training (default: 128)')
    group.add_argument('-vb', '--validation-batch-size', type=int, default=None, metavar='N',
                       help='Validation batch size override (default: None)')
    group.add_argument('--channels-last', action='store_true', default=False, help='Use channels_last memory layout')
    group.add_argument('--grad-accum-steps', type=int, default=1, metavar='N',
                       help='The number of steps to accumulate gradients (default: 1)')
    group.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                       help='Enable compilation w/ specified backend (default: inductor).')
    group.add_argument('--drop', type=float, default=0.0, metavar='PCT', help='Dropout rate (default: 0.)')
    group.add_argument('--drop-path', type=float, default=None, metavar='PCT', help='Drop path rate (default: None)')

    group = parser.add_argument_group('Device parameters')
    group.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', type=str,
                       help='Device (accelerator) to use (default: cuda when available, else cpu).')
    group.add_argument('--amp', action='store_true', default=False, help='use AMP for mixed precision training')
    group.add_argument('--amp-dtype', default='float16', choices=('float16', 'bfloat16'),
                       help='lower precision AMP dtype (default: float16)')
    group.add_argument('--no-ddp-bb', action='store_true', default=False,
                       help='Force broadcast buffers for native DDP to off.')
    group.add_argument('--local_rank', default=0, type=int)

    group = parser.add_argument_group('Optimizer parameters')
    group.add_argument('--opt', default='sgd', type=str, metavar='OPTIMIZER', help='Optimizer (default: "sgd")')
    group.add_argument('--opt-eps', default=None, type=float, metavar='EPSILON',
                       help='Optimizer Epsilon (default: None, use opt default)')
    group.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA',
                       help='Optimizer Betas (default: None, use opt default)')
    group.add_argument('--momentum', type=float, default=0.9, metavar='M', help='Optimizer momentum (default: 0.9)')
    group.add_argument('--weight-decay', type=float, default=2e-5, help='weight decay (default: 2e-5)')
    group.add_argument('--clip-grad', type=float, default=None, metavar='NORM',
                       help='Clip gradient norm (default: None, no clipping)')
    group.add_argument('--clip-mode', type=str, default='norm',
                       help='Gradient clipping mode. One of ("norm", "value", "agc")')

    group = parser.add_argument_group('Learning rate schedule parameters')
    group.add_argument('--sched', type=str, default='cosine', metavar='SCHEDULER',
                       help='LR scheduler (default: "cosine")')
    group.add_argument('--sched-on-updates', action='store_true', default=False,
                       help='Apply LR scheduler step on update instead of epoch end.')
    group.add_argument('--lr', type=float, default=None, metavar='LR',
                       help='learning rate, overrides lr-base if set (default: None)')
    group.add_argument('--lr-base', type=float, default=0.1, metavar='LR',
                       help='base learning rate: lr = lr_base * global_batch_size / base_size')
    group.add_argument('--lr-base-size', type=int, default=256, metavar='DIV',
                       help='base learning rate batch size (divisor, default: 256).')
    group.add_argument('--lr-base-scale', type=str, default='', metavar='SCALE',
                       help='base learning rate vs batch_size scaling ("linear", "sqrt", based on opt if empty)')
    group.add_argument('--warmup-lr', type=float, default=1e-5, metavar='LR',
                       help='warmup learning rate (default: 1e-5)')
    group.add_argument('--min-lr', type=float, default=0, metavar='LR',
                       help='lower lr bound for cyclic schedulers that hit 0 (default: 0)')
    group.add_argument('--epochs', type=int, default=300, metavar='N', help='number of epochs to train (default: 300)')
    group.add_argument('--start-epoch', default=None, type=int, metavar='N',
                       help='manual epoch number (useful on restarts)')
    group.add_argument('--decay-milestones', default=[90, 180, 270], type=int, nargs='+', metavar='MILESTONES',
                       help='list of decay epoch indices for multistep lr. must be increasing')
    group.add_argument('--decay-epochs', type=float, default=90, metavar='N', help='epoch interval to decay LR')
    group.add_argument('--warmup-epochs', type=int, default=5, metavar='N',
                       help='epochs to warmup LR, if scheduler supports')
    group.add_argument('--warmup-prefix', action='store_true', default=False,
                       help='Exclude warmup period from decay schedule.')
    group.add_argument('--cooldown-epochs', type=int, default=0, metavar='N',
                       help='epochs to cooldown LR at min_lr, after cyclic schedule ends')
    group.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE',
                       help='LR decay rate (default: 0.1)')

    group = parser.add_argument_group('Augmentation and regularization parameters')
    group.add_argument('--no-aug', action='store_true', default=False,
                       help='Disable all training augmentation, override other train aug args')
    group.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0], metavar='PCT',
                       help='Random resize scale (default: 0.08 1.0)')
    group.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.], metavar='RATIO',
                       help='Random resize aspect ratio (default: 0.75 1.33)')
    group.add_argument('--hflip', type=float, default=0.5, help='Horizontal flip training aug probability')
    group.add_argument('--vflip', type=float, default=0., help='Vertical flip training aug probability')
    group.add_argument('--color-jitter', type=float, default=0.4, metavar='PCT',
                       help='Color jitter factor (default: 0.4)')
    group.add_argument('--aa', type=str, default=None, metavar='NAME',
                       help='Use AutoAugment policy. "v0" or "original". (default: None)')
    group.add_argument('--reprob', type=float, default=0., metavar='PCT', help='Random erase prob (default: 0.)')
    group.add_argument('--remode', type=str, default='pixel', help='Random erase mode (default: "pixel")')
    group.add_argument('--recount', type=int, default=1, help='Random erase count (default: 1)')
    group.add_argument('--mixup', type=float, default=0.0,
                       help='mixup alpha, mixup enabled if > 0. (default: 0.)')
    group.add_argument('--cutmix', type=float, default=0.0,
                       help='cutmix alpha, cutmix enabled if > 0. (default: 0.)')
    group.add_argument('--cutmix-minmax', type=float, nargs='+', default=None,
                       help='cutmix min/max ratio, overrides alpha and enables cutmix if set (default: None)')
    group.add_argument('--mixup-prob', type=float, default=1.0,
                       help='Probability of performing mixup or cutmix when either/both is enabled')
    group.add_argument('--mixup-switch-prob', type=float, default=0.5,
                       help='Probability of switching to cutmix when both mixup and cutmix enabled')
    group.add_argument('--mixup-mode', type=str, default='batch',
                       help='How to apply mixup/cutmix params. Per "batch", "pair", or "elem"')
    group.add_argument('--mixup-off-epoch', default=0, type=int, metavar='N',
                       help='Turn off mixup after this epoch, disabled if 0 (default: 0)')
    group.add_argument('--smoothing', type=float, default=0.1, help='Label smoothing (default: 0.1)')
    group.add_argument('--train-interpolation', type=str, default='random',
                       help='Training interpolation (random, bilinear, bicubic default: "random")')

    group = parser.add_argument_group('Model exponential moving average parameters')
    group.add_argument('--model-ema', action='store_true', default=False,
                       help='Enable tracking moving average of model weights.')
    group.add_argument('--model-ema-decay', type=float, default=0.9998,
                       help='Decay factor for model weights moving average (default: 0.9998)')
    group.add_argument('--model-ema-warmup', action='store_true', help='Enable warmup for model EMA decay.')

    group = parser.add_argument_group('Miscellaneous parameters')
    group.add_argument('--seed', type=int, default=42, metavar='S', help='random seed (default: 42)')
    group.add_argument('--worker-seeding', type=str, default='all', help='worker seed mode (default: all)')
    group.add_argument('--log-interval', type=int, default=50, metavar='N',
                       help='how many batches to wait before logging training status')
    group.add_argument('--checkpoint-hist', type=int, default=10, metavar='N',
                       help='number of checkpoints to keep (default: 10)')
    group.add_argument('-j', '--workers', type=int, default=4, metavar='N',
                       help='how many training processes to use (default: 4)')
    group.add_argument('--pin-mem', action='store_true', default=False,
                       help='Pin CPU memory in DataLoader for more efficient (sometimes) transfer to GPU.')
    group.add_argument('--no-prefetcher', action='store_true', default=False, help='disable fast prefetcher')
    group.add_argument('--output', default='', type=str, metavar='PATH',
                       help='path to output folder (default: none, current dir)')
    group.add_argument('--experiment', default='', type=str, metavar='NAME',
                       help='name of train experiment, name of sub-folder for output')
    group.add_argument('--eval-metric', default='top1', type=str, metavar='EVAL_METRIC',
                       help='Best metric (default: "top1"')


def build_parser() -> Tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """(config parser, main parser): the first reads only ``-c/--config``, whose YAML sets the second's defaults."""
    config_parser = argparse.ArgumentParser(description='Training Config', add_help=False)
    config_parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                               help='YAML config file specifying default arguments')
    parser = argparse.ArgumentParser(
        prog='timm-sadistill train', parents=[config_parser], allow_abbrev=False,
        description='Train a timm model, optionally distilling a teacher into it (timm train.py flags).',
    )
    _add_timm_arguments(parser)
    add_distill_arguments(parser)
    group = parser.add_argument_group('Training loop (timm-sadistill)')
    group.add_argument('--skip-nonfinite', action='store_true', default=False,
                       help='Skip a step whose loss is NaN/inf with a warning (default: stop with an error)')
    group.add_argument('--save-attention-maps', action='store_true', default=False,
                       help='After training, save teacher/student attention maps of validation images '
                            '(needs timm_sadistill.viz)')
    return config_parser, parser


def parse_args(argv: List[str]) -> Tuple[argparse.Namespace, str]:
    """(args, args as YAML text for args.yaml); ``-c FILE`` sets defaults as in timm's train.py."""
    config_parser, parser = build_parser()
    args_config, remaining = config_parser.parse_known_args(argv)
    if args_config.config:
        if not os.path.isfile(args_config.config):
            raise UsageError(f"Config file '{args_config.config}' does not exist; pass a YAML file to -c/--config.")
        with open(args_config.config) as f:
            config = yaml.safe_load(f) or {}
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(config) - known)
        if unknown:
            raise UsageError(f"Config file '{args_config.config}' sets unknown options {', '.join(unknown)}; "
                             "use the flag names with '_' for '-' (e.g. batch_size).")
        parser.set_defaults(**config)
    args = parser.parse_args(remaining)
    args.config = args_config.config
    args_text = yaml.safe_dump({k: v for k, v in vars(args).items()}, default_flow_style=False)
    return args, args_text


# ----------------------------------------------------------------------------------------------------------------
# Distillation task options (shared with timm-train)


def loss_accepts(name: str, option: str) -> bool:
    """Whether the loss registered as ``name`` takes keyword ``option`` (e.g. 'temperature')."""
    return option in loss_options(name).defaults


def distill_task_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """Keyword arguments for ``create_distill_task`` from the flags of `add_distill_arguments`.

    Raises:
        UsageError: an SA flag given to another method.
    """
    sa_given = sa_options(args)
    if sa_given and args.distill != 'sa':
        flags = ', '.join(sa_flag(option) for option in SA_OPTIONS if option.name in sa_given)
        raise UsageError(f"{flags}: SA options, but the method is --distill {args.distill}; drop them or use --distill sa.")
    return dict(
        teacher_pretrained_path=args.teacher_checkpoint,
        teacher_pretrained=args.teacher_pretrained,
        student_stages=args.distill_stages,
        teacher_stages=args.teacher_stages,
        **sa_given,
    )


def _check_distill_args(args: argparse.Namespace) -> None:
    """Refuse inconsistent model/teacher flags before anything is loaded."""
    if not is_model(args.model):
        raise UsageError(f"Unknown model '{args.model}'; list the names with timm.list_models('*pattern*').")
    if args.distill == 'none':
        if args.teacher or args.teacher_checkpoint:
            raise UsageError("--teacher/--teacher-checkpoint need a method: add --distill sa (or kd, at, ...).")
        return
    if not args.teacher:
        raise UsageError(f"--distill {args.distill} needs a teacher: add --teacher NAME --teacher-checkpoint FILE.")
    if not is_model(args.teacher):
        raise UsageError(f"Unknown teacher model '{args.teacher}'; list the names with timm.list_models('*pattern*').")
    if not args.teacher_checkpoint and not args.teacher_pretrained:
        raise UsageError(f"Teacher '{args.teacher}' has no weights: pass --teacher-checkpoint FILE (.safetensors or timm "
                         ".pth), or --teacher-pretrained to download them from the hub.")
    if args.kd_temperature is not None and not loss_accepts(args.distill, 'temperature'):
        raise UsageError(f"--kd-temperature does not apply to --distill {args.distill}; drop it.")
    if args.save_attention_maps:
        if args.distill != 'sa':
            raise UsageError("--save-attention-maps draws SA's attention maps; use it with --distill sa.")
        from ..viz import require_matplotlib
        require_matplotlib()  # before training, not after it


# ----------------------------------------------------------------------------------------------------------------
# Data


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


def _create_datasets(args: argparse.Namespace, data_config: Dict[str, Any]):
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


def _create_loaders(args, data_config, dataset_train, dataset_eval, device):
    """Train/eval loaders as timm's train.py builds them (prefetcher, mixup collate, distributed samplers)."""
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


def _create_train_loss(args: argparse.Namespace, mixup_active: bool, device: torch.device) -> nn.Module:
    if mixup_active:  # smoothing is part of the mixup targets
        loss = SoftTargetCrossEntropy()
    elif args.smoothing:
        loss = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        loss = nn.CrossEntropyLoss()
    return loss.to(device=device)


# ----------------------------------------------------------------------------------------------------------------
# Train and evaluate


def _scalar_terms(result: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The task's loss and each named loss term (every scalar tensor of its result)."""
    return {k: v.detach().float() for k, v in result.items() if torch.is_tensor(v) and v.ndim == 0}


def _all_ranks_finite(loss: torch.Tensor, args: argparse.Namespace) -> bool:
    """Whether the loss is finite on every rank (ranks must agree on skipping a step, or DDP hangs)."""
    finite = torch.isfinite(loss.detach()).to(torch.int32)
    if args.distributed:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def train_one_epoch(
        epoch: int,
        task: TrainingTask,
        loader,
        optimizer: torch.optim.Optimizer,
        args: argparse.Namespace,
        device: torch.device,
        lr_scheduler=None,
        amp_autocast: Callable = suppress,
        loss_scaler: Optional[NativeScaler] = None,
        mixup_fn: Optional[Mixup] = None,
) -> 'OrderedDict[str, float]':
    """One epoch of timm's train loop (gradient accumulation, AMP, clipping, EMA); returns the mean loss and the
    mean of every loss term (averaged over ranks)."""
    if args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        if args.prefetcher and getattr(loader, 'mixup_enabled', False):
            loader.mixup_enabled = False
        elif mixup_fn is not None:
            mixup_fn.mixup_enabled = False

    task.train()
    accum_steps = args.grad_accum_steps
    num_batches = len(loader)
    last_accum_steps = num_batches % accum_steps
    last_batch_idx_to_accum = num_batches - last_accum_steps
    updates_per_epoch = (num_batches + accum_steps - 1) // accum_steps
    num_updates = epoch * updates_per_epoch
    term_sums: Dict[str, torch.Tensor] = {}
    num_samples = 0
    skipped = 0
    show_bar = utils.is_primary(args) and sys.stderr.isatty()
    progress = ProgressBar(num_batches, f'Train {epoch}') if show_bar else None
    start = time.time()

    optimizer.zero_grad()
    for batch_idx, (input, target) in enumerate(loader):
        last_batch = batch_idx == num_batches - 1
        need_update = last_batch or (batch_idx + 1) % accum_steps == 0
        if batch_idx >= last_batch_idx_to_accum:
            accum_steps = last_accum_steps
        if not args.prefetcher:
            input, target = input.to(device), target.to(device)
            if mixup_fn is not None:
                input, target = mixup_fn(input, target)
        if args.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)

        # DDP syncs gradients only on the micro-batch that updates
        sync_context = task.no_sync if (args.distributed and not need_update) else suppress
        with sync_context():
            with amp_autocast():
                result = task(input, target)
            loss = result['loss']
            terms = _scalar_terms(result)
            if not _all_ranks_finite(loss, args):
                # the check above reads one scalar; only now is the culprit (stage, tensor, term) looked for
                bad = describe_nonfinite(task, input, target)
                if not args.skip_nonfinite:
                    raise NonFiniteLossError(
                        f"Non-finite loss at epoch {epoch}, batch {batch_idx}: {bad}. Lower --lr, check the data, "
                        "or pass --skip-nonfinite to skip such steps."
                    )
                _logger.warning(f"Skipping step (epoch {epoch}, batch {batch_idx}): non-finite {bad}.")
                skipped += 1
            else:
                scaled = loss / accum_steps if accum_steps > 1 else loss
                clip_parameters = (
                    task.get_clip_parameters(exclude_head='agc' in args.clip_mode) if args.clip_grad is not None else None
                )
                if loss_scaler is not None:
                    loss_scaler(scaled, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                                parameters=clip_parameters, need_update=need_update)
                else:
                    scaled.backward()
                    if need_update:
                        if args.clip_grad is not None:
                            utils.dispatch_clip_grad(clip_parameters, value=args.clip_grad, mode=args.clip_mode)
                        optimizer.step()
                batch_size = input.shape[0]
                num_samples += batch_size
                for name, value in terms.items():
                    term_sums[name] = term_sums.get(name, torch.zeros((), device=value.device)) + value * batch_size

        if not need_update:
            continue
        num_updates += 1
        optimizer.zero_grad()
        task.update_ema(step=num_updates)
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates)

        update_idx = batch_idx // args.grad_accum_steps
        if progress is not None:
            progress.update(batch_idx + 1 - progress.count, postfix=f'loss {loss.item():.4g}')
        elif utils.is_primary(args) and (update_idx % args.log_interval == 0 or last_batch):
            lr = sum(g['lr'] for g in optimizer.param_groups) / len(optimizer.param_groups)
            rate = (batch_idx + 1) * input.shape[0] * args.world_size / max(time.time() - start, 1e-9)
            _logger.info(f'Train: {epoch} [{update_idx:>4d}/{updates_per_epoch}]  Loss: {loss.item():#.4g}  '
                         f'{rate:>7.2f} samples/s  LR: {lr:.3e}')
    if progress is not None:
        progress.close()

    names = sorted(term_sums, key=lambda k: (k != 'loss', k))
    totals = torch.stack([term_sums[k] for k in names] + [torch.tensor(float(num_samples), device=device)]) \
        if names else torch.tensor([float(num_samples)], device=device)
    if args.distributed:
        dist.all_reduce(totals)
    count = max(totals[-1].item(), 1.0)
    metrics = OrderedDict((name, totals[i].item() / count) for i, name in enumerate(names))
    if skipped:
        metrics['skipped_steps'] = skipped
    return metrics


@torch.no_grad()
def validate(
        predict: Callable[[torch.Tensor], torch.Tensor],
        loader,
        args: argparse.Namespace,
        device: torch.device,
        amp_autocast: Callable = suppress,
        log_name: str = 'Test',
) -> 'OrderedDict[str, float]':
    """Cross-entropy loss, top-1 and top-5 (percent) of ``predict`` over ``loader``, averaged over ranks."""
    loss_fn = nn.CrossEntropyLoss()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, samples
    for input, target in loader:
        if not args.prefetcher:
            input, target = input.to(device), target.to(device)
        if args.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        with amp_autocast():
            output = predict(input)
        output = output.float()
        acc1, acc5 = utils.accuracy(output, target, topk=(1, min(5, output.shape[-1])))
        batch_size = target.shape[0]
        totals += torch.stack([
            loss_fn(output, target).double() * batch_size,
            acc1.double() * batch_size / 100, acc5.double() * batch_size / 100,
            torch.tensor(float(batch_size), dtype=torch.float64, device=device),
        ])
    if args.distributed:
        dist.all_reduce(totals)
    count = max(totals[3].item(), 1.0)
    metrics = OrderedDict(loss=totals[0].item() / count, top1=100 * totals[1].item() / count,
                          top5=100 * totals[2].item() / count)
    if utils.is_primary(args):
        _logger.info(f"{log_name}: Loss {metrics['loss']:.4f}  Acc@1 {metrics['top1']:.3f}  Acc@5 {metrics['top5']:.3f}")
    return metrics


def _log_teacher_accuracy(task, loader_eval, args, device, amp_autocast) -> None:
    """Log the teacher's validation top-1: a teacher that does not know the task cannot teach it."""
    teacher = task.teacher

    def predict(input: torch.Tensor) -> torch.Tensor:
        return teacher.model(teacher.normalize_input(input, task.student_mean, task.student_std))

    metrics = validate(predict, loader_eval, args, device, amp_autocast, log_name='Teacher')
    if utils.is_primary(args):
        _logger.info(f"Teacher {args.teacher} top-1 on '{args.val_split}': {metrics['top1']:.2f}%")


def _save_attention_maps(task, loader, output_dir: str) -> None:
    """The teacher's and the student's maps for the first images of ``loader``, as attention_maps.png."""
    from ..viz import save_attention_maps
    _logger.info(f'Attention maps written to {save_attention_maps(task, loader, output_dir)}')


def _dump_rank_params(task: TrainingTask, args: argparse.Namespace) -> None:
    """Test-only (TSD_TEST_DUMP_PARAMS): every rank writes its final student state for a cross-rank comparison."""
    folder = os.environ.get(DUMP_PARAMS_ENV)
    if folder:
        os.makedirs(folder, exist_ok=True)
        state = get_state_dict(task.get_eval_model(), unwrap_model)
        save_safetensors_atomic({k: v.cpu() for k, v in state.items()}, os.path.join(folder, f'rank{args.rank}.safetensors'))


def _create_task(args, model, train_loss, device, img_size) -> TrainingTask:
    if args.distill == 'none':
        return ClassificationTask(model, criterion=train_loss, device=device, verbose=utils.is_primary(args))
    options = distill_task_kwargs(args)
    if args.kd_temperature is not None:
        options['temperature'] = args.kd_temperature
    return create_distill_task(
        args.distill, model, args.teacher, criterion=train_loss, img_size=img_size,
        distill_loss_weight=args.distill_loss_weight, task_loss_weight=args.task_loss_weight,
        device=device, verbose=utils.is_primary(args), **options,
    )


def train(args: argparse.Namespace, args_text: str) -> Dict[str, Any]:
    """Run the whole training; returns ``{'output_dir', 'best_metric', 'best_epoch'}`` (output_dir None off rank 0)."""
    _check_distill_args(args)
    args.prefetcher = not args.no_prefetcher
    args.grad_accum_steps = max(1, args.grad_accum_steps)
    if args.resume and not os.path.isfile(args.resume):
        raise UsageError(f"--resume checkpoint '{args.resume}' does not exist; pass a last.pth.tar of an earlier run.")
    device = utils.init_distributed_device(args)
    try:
        return _train_on_device(args, args_text, device)
    finally:
        if args.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train_on_device(args: argparse.Namespace, args_text: str, device: torch.device) -> Dict[str, Any]:
    if args.distributed:
        _logger.info(f'Distributed training: process {args.rank} of {args.world_size}, device {args.device}.')
    amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    utils.random_seed(args.seed, args.rank)

    for flag, path in (('--initial-checkpoint', args.initial_checkpoint), ('--resume', args.resume)):
        if path:  # before anything is created or written: a bad file must not cost the output folder
            check_checkpoint_readable(path, f'{flag} checkpoint')
    in_chans = args.in_chans or (args.input_size[0] if args.input_size else 3)
    model = create_model(
        args.model, pretrained=args.pretrained, in_chans=in_chans, num_classes=args.num_classes,
        drop_rate=args.drop, drop_path_rate=args.drop_path, checkpoint_path=args.initial_checkpoint or None,
    )
    if args.num_classes is None:
        args.num_classes = model.num_classes
    data_config = resolve_data_config(vars(args), model=model, verbose=utils.is_primary(args))
    model.to(device=device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)

    amp_autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype) if args.amp else suppress
    loss_scaler = NativeScaler(device=device.type) if args.amp and device.type == 'cuda' and amp_dtype == torch.float16 else None

    dataset_train, dataset_eval = _create_datasets(args, data_config)
    loader_train, loader_eval, mixup_fn, mixup_active = _create_loaders(args, data_config, dataset_train, dataset_eval, device)
    train_loss = _create_train_loss(args, mixup_active, device)

    task = _create_task(args, model, train_loss, device, img_size=tuple(data_config['input_size'][1:]))
    task.to(device)
    if args.distill != 'none' and loader_eval is not None:
        _log_teacher_accuracy(task, loader_eval, args, device, amp_autocast)

    if not args.lr:  # timm's rule: scale lr_base by the global batch size
        batch_ratio = args.batch_size * args.world_size * args.grad_accum_steps / args.lr_base_size
        if not args.lr_base_scale:
            args.lr_base_scale = 'sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear'
        args.lr = args.lr_base * (batch_ratio ** 0.5 if args.lr_base_scale == 'sqrt' else batch_ratio)
    # the trainable module holds the student and the loss's connectors, so both train
    optimizer = create_optimizer_v2(task.get_trainable_module(), **optimizer_kwargs(cfg=args))

    resume_epoch = None
    if args.resume:
        resume_epoch = resume_task_checkpoint(
            task, args.resume, optimizer=None if args.no_resume_opt else optimizer,
            loss_scaler=None if args.no_resume_opt else loss_scaler, log_info=utils.is_primary(args),
        )
    if args.model_ema:  # after moving to the device, before DDP, as in timm
        task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)
        if args.resume:
            load_task_ema_checkpoint(task, args.resume)
    if args.torchcompile:
        task.compile(backend=args.torchcompile)
        if task.has_ema():
            task.compile_ema(backend=args.torchcompile)
    if args.distributed:
        # pass broadcast_buffers only to turn it off: newer torch warns whenever it is given
        ddp_kwargs = {'broadcast_buffers': False} if args.no_ddp_bb else {}
        task.prepare_distributed(device_ids=[device] if device.type == 'cuda' else None, **ddp_kwargs)

    eval_metric = args.eval_metric if loader_eval is not None else 'loss'
    decreasing_metric = eval_metric == 'loss'
    output_dir = saver = None
    if utils.is_primary(args):
        experiment = args.experiment or '-'.join([
            datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model), str(data_config['input_size'][-1]),
        ])
        output_dir = utils.get_outdir(args.output or './output/train', experiment)
        saver = AtomicCheckpointSaver(
            model=task.get_trainable_module(), optimizer=optimizer, args=args, amp_scaler=loss_scaler,
            checkpoint_dir=output_dir, recovery_dir=output_dir, decreasing=decreasing_metric,
            max_history=args.checkpoint_hist, task=task,
        )
        if args.resume and os.path.dirname(os.path.abspath(args.resume)) == os.path.abspath(output_dir):
            saver.load_state_dict_from_checkpoint(args.resume)  # keep ranking checkpoints as before the restart
        with open(os.path.join(output_dir, 'args.yaml'), 'w') as f:
            f.write(args_text)

    updates_per_epoch = (len(loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args, decreasing_metric=decreasing_metric), updates_per_epoch=updates_per_epoch,
    )
    start_epoch = args.start_epoch if args.start_epoch is not None else (resume_epoch or 0)
    if lr_scheduler is not None and start_epoch > 0:  # the schedule is a function of the epoch: replay it
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)
    if utils.is_primary(args):
        _logger.info(f'Training epochs {start_epoch}..{num_epochs - 1}, output in {output_dir}')

    best_metric = best_epoch = None
    for epoch in range(start_epoch, num_epochs):
        for sampler in (getattr(loader_train, 'sampler', None), getattr(loader_train, 'batch_sampler', None)):
            if hasattr(sampler, 'set_epoch'):
                sampler.set_epoch(epoch)
                break
        train_metrics = train_one_epoch(epoch, task, loader_train, optimizer, args, device, lr_scheduler,
                                        amp_autocast, loss_scaler, mixup_fn)
        if args.distributed:  # BatchNorm running stats differ per rank: average them as timm does
            utils.distribute_bn(task.get_trainable_module(), args.world_size, True)

        eval_metrics = None
        if loader_eval is not None:
            eval_model = task.get_eval_model()
            eval_model.eval()
            eval_metrics = validate(eval_model, loader_eval, args, device, amp_autocast)
            if task.has_ema():  # as in timm: with EMA, the EMA weights are the ones that are ranked
                ema_eval_model = task.get_eval_model(ema=True)
                ema_eval_model.eval()
                eval_metrics = validate(ema_eval_model, loader_eval, args, device, amp_autocast, log_name='Test (EMA)')
        latest_metric = (eval_metrics or train_metrics)[eval_metric]

        if saver is not None:
            lrs = [group['lr'] for group in optimizer.param_groups]
            utils.update_summary(epoch, train_metrics, eval_metrics, filename=os.path.join(output_dir, 'summary.csv'),
                                 lr=sum(lrs) / len(lrs), write_header=epoch == start_epoch and not args.resume)
            best_metric, best_epoch = saver.save_checkpoint(epoch, metric=latest_metric)
            if best_epoch == epoch or not os.path.exists(os.path.join(output_dir, 'model.safetensors')):
                _export_student(task, args, output_dir, epoch)
        if lr_scheduler is not None:
            lr_scheduler.step(epoch + 1, latest_metric)

    if best_metric is not None:
        _logger.info(f'*** Best metric: {best_metric} (epoch {best_epoch})')
    if args.save_attention_maps and saver is not None:
        _save_attention_maps(task, loader_eval if loader_eval is not None else loader_train, output_dir)
    _dump_rank_params(task, args)
    return {'output_dir': output_dir, 'best_metric': best_metric, 'best_epoch': best_epoch}


def _export_student(task: TrainingTask, args: argparse.Namespace, output_dir: str, epoch: int) -> None:
    """model.safetensors: the bare student (EMA weights when EMA is ranked), keys as timm.create_model expects."""
    model = task.get_eval_model(ema=task.has_ema())
    state = get_state_dict(model, unwrap_model)
    metadata = {'arch': args.model, 'num_classes': str(args.num_classes), 'epoch': str(epoch), 'format': 'pt'}
    save_safetensors_atomic({k: v.cpu() for k, v in state.items()}, os.path.join(output_dir, 'model.safetensors'), metadata)


def main(argv: Optional[List[str]] = None) -> int:
    """``timm-sadistill train ...``; returns the exit status."""
    utils.setup_default_logging()
    args, args_text = parse_args(list(sys.argv[1:] if argv is None else argv))
    train(args, args_text)
    return 0
