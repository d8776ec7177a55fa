"""The checks of a ``train`` run before its first step, each mistake one line that names the flag: the flags alone
(`check_train_flags`, before anything is loaded: timm's train.py finds most of these only when it builds the
optimizer, the scheduler or the loader, after the teacher's validation pass here), the classes of student, teacher
and data (`check_classes`, before a model is built) and a batch BatchNorm cannot train on (`check_batch_of_one`).
The checks of ``--resume`` are `resume_checks`'."""
import argparse
import logging
import os
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm import utils

from ..errors import UsageError
from ..model_folder import ModelName
from ..tasks.teacher_classes import (
    describe_mapping, match_teacher_classes, preview_names, teacher_class_names, teacher_num_classes,
)

__all__ = [
    'check_train_flags', 'check_classes', 'check_batch_of_one', 'check_normalisation', 'NON_FOLDER_DATASETS',
]

_logger = logging.getLogger('timm_sadistill.train')

# timm's dataset types other than image folders and tars (timm.data.create_dataset): train does not implement them
NON_FOLDER_DATASETS = ('torch/', 'hfds/', 'hfids/', 'tfds/', 'wds/')


def _check_dataset(dataset: str) -> None:
    if dataset and dataset.lower().startswith(NON_FOLDER_DATASETS):
        raise UsageError(
            f"--dataset {dataset}: timm-sadistill train reads image folders and tars only (--data-dir, no "
            "--dataset); train on this dataset with your train.py through `timm-sadistill timm-train "
            f"path/to/train.py ... --dataset {dataset} ... --distill METHOD`.")


def _check_numbers(args: argparse.Namespace) -> None:
    """Batch sizes, learning rates and the gradient clip: the signs timm takes without a word or fails on late."""
    if args.batch_size < 1:
        raise UsageError(f"-b/--batch-size {args.batch_size}: the batch size is a positive number of images, "
                         "e.g. -b 32.")
    if args.validation_batch_size is not None and args.validation_batch_size < 1:
        raise UsageError(f"-vb/--validation-batch-size {args.validation_batch_size}: the batch size is a positive "
                         "number of images; drop it to use -b.")
    for flag, value in (('--lr', args.lr), ('--lr-base', args.lr_base), ('--min-lr', args.min_lr),
                        ('--warmup-lr', args.warmup_lr)):
        if value is not None and value < 0:
            raise UsageError(f"{flag} {value}: a learning rate is 0 or more (a negative one climbs the loss).")
    if args.clip_grad is not None and args.clip_grad <= 0:
        raise UsageError(f"--clip-grad {args.clip_grad}: the clip bound is a positive number (at or below 0 it "
                         "zeroes or flips the gradients); e.g. --clip-grad 1.0, or drop it.")


def _check_optimizer(opt: str) -> None:
    """timm's optimizer names, with its ``lookahead_`` prefix (timm.optim.create_optimizer_v2's parsing)."""
    from timm.optim import get_optimizer_info
    name = opt.lower().split('_')[-1]
    try:
        get_optimizer_info(name)
    except ValueError:
        raise UsageError(f"--opt {opt}: timm has no optimizer '{name}'; list them with "
                         "python -c \"import timm.optim; print(timm.optim.list_optimizers())\".") from None


def _check_scheduler(args: argparse.Namespace) -> None:
    """Builds timm's scheduler from the flags for a stand-in optimizer: its checks of --sched and its settings."""
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    try:
        create_scheduler_v2(optimizer, **scheduler_kwargs(args), updates_per_epoch=1)
    except (ValueError, AssertionError) as e:
        reason = str(e).splitlines()[0].rstrip('.') if str(e) else 'timm refuses it'
        raise UsageError(f"--sched {args.sched}: {reason} (timm.scheduler.create_scheduler_v2); e.g. --sched "
                         "cosine.") from None


def _check_auto_augment(aa: str) -> None:
    """Builds timm's train transform with ``--aa``: its parsing of the policy string."""
    from timm.data import create_transform
    try:
        create_transform(32, is_training=True, auto_augment=aa)
    except Exception as e:  # timm's policy parsers raise KeyError, ValueError, AssertionError, IndexError alike
        raise UsageError(f"--aa {aa}: not an augmentation policy timm knows ({type(e).__name__}: {e}); e.g. "
                         "--aa rand-m9-mstd0.5-inc1, augmix-m5-w4-d2 or original.") from None


def _check_compile_backend(backend: str) -> None:
    import torch._dynamo
    if backend not in torch._dynamo.list_backends(exclude_tags=()):  # debug backends pass, but go unlisted
        raise UsageError(f"--torchcompile {backend}: torch has no such compile backend; use one of "
                         f"{', '.join(torch._dynamo.list_backends())} (e.g. --torchcompile inductor).")


def check_train_flags(args: argparse.Namespace) -> None:
    """Refuse flags timm would take without a word (a negative learning rate or clip) or refuse only after the
    models, the data and the teacher's validation pass (an unknown optimizer, scheduler or augmentation policy, a
    batch of no images, a dataset type this command does not read, a missing class map, a compile backend torch
    does not have); each with one line that names the flag."""
    _check_dataset(args.dataset)
    _check_numbers(args)
    _check_optimizer(args.opt)
    _check_scheduler(args)
    if args.aa:
        _check_auto_augment(args.aa)
    if args.class_map and not os.path.isfile(args.class_map):
        raise UsageError(f"--class-map '{args.class_map}' does not exist; pass a file with one class folder name "
                         "per line (or drop it to number the class folders in sorted order).")
    if args.torchcompile:
        _check_compile_backend(args.torchcompile)


def _data_classes(dataset) -> Optional[List[str]]:
    """The class names of a folder dataset in index order (its class folders, or its --class-map); None otherwise."""
    class_to_idx = getattr(getattr(dataset, 'reader', None), 'class_to_idx', None)
    return sorted(class_to_idx, key=class_to_idx.get) if class_to_idx else None


_preview = preview_names


def _check_label_names(flag: str, model: ModelName, classes: List[str], root: str) -> None:
    """The classes a model folder names (config.json label_names) are the data's, in the data's order."""
    names = model.label_names
    if names == classes:
        return
    if sorted(names) == sorted(classes):
        k = next(i for i, (a, b) in enumerate(zip(names, classes)) if a != b)
        raise UsageError(
            f"{flag} {model.name} has the classes of '{root}' in another order (class {k} is '{names[k]}' for it, "
            f"'{classes[k]}' in the data); pass --class-map FILE with its label_names, one per line in its order, "
            "so that the indices agree.")
    missing, extra = sorted(set(names) - set(classes)), sorted(set(classes) - set(names))
    raise UsageError(
        f"{flag} {model.name} knows other classes than the class folders of '{root}' (only {flag}'s: "
        f"{_preview(missing) or '-'}; only the data's: {_preview(extra) or '-'}); train it on data of its classes, "
        f"or start from its architecture: --model {model.architecture}.")


def check_classes(args: argparse.Namespace, dataset_train, student: ModelName, teacher: Optional[ModelName]) -> None:
    """Settle ``args.num_classes`` and ``args.teacher_classes``, and refuse student, teacher and data that disagree on
    the classes, before any model is built.

    Without ``--num-classes`` the head has the data's class folders (else the teacher folder's or the student
    folder's classes; else the model's default). ``--num-classes`` below the class folders is refused (labels past
    the head fail deep in the loss, or corrupt memory on a GPU); so is a student model folder whose label names are
    not the class folders in their order. A teacher whose classes include the class folders is distilled on them
    (`_teacher_classes`); one of other classes is refused. A teacher without label names, of the data's class
    count, can only be trusted: one line says so.
    """
    classes = _data_classes(dataset_train)
    root = getattr(getattr(dataset_train, 'reader', None), 'root', None) or args.data_dir
    given = args.num_classes is not None
    if not given:
        known = len(classes) if classes else (teacher and teacher.num_classes) or student.num_classes
        if known and classes and utils.is_primary(args):
            _logger.info(f"--num-classes {known}: the class folders of '{root}' ({_preview(classes)}).")
        args.num_classes = known
    if classes and args.num_classes is not None and len(classes) > args.num_classes:
        raise UsageError(f"--num-classes {args.num_classes} is below the {len(classes)} class folders of "
                         f"'{root}'; pass --num-classes {len(classes)}.")
    args.teacher_classes = _teacher_classes(args, teacher, classes, root, given) if teacher is not None else None
    if student.num_classes == args.num_classes and student.label_names and classes and \
            len(classes) == args.num_classes:  # a model folder that keeps its head: its classes must be the data's
        _check_label_names('--model', student, classes, root)


def _teacher_classes(args: argparse.Namespace, teacher: ModelName, classes: Optional[List[str]], root: str,
                     given: bool) -> Optional[List[int]]:
    """The teacher's class of each class folder, in their order, for a teacher that knows other classes than the
    data's (its label_names, or the ImageNet synsets of its class count: `teacher_class_names`) and among them every
    class folder; None for a teacher of the data's classes. Refuses a teacher of other classes, naming the class
    folders it does not know."""
    count = teacher_num_classes(teacher, args.teacher_checkpoint, args.teacher_pretrained)
    if count in (None, args.num_classes) and (not classes or teacher.label_names in (None, classes)):
        if not teacher.label_names and classes and len(classes) == args.num_classes and utils.is_primary(args):
            _logger.warning(f"--teacher {teacher.name} names no classes (no label_names in a config.json), so whether "
                            f"its class k is the k-th class folder of '{root}' could not be checked.")
        return None
    if given and (not classes or len(classes) == count) and count != args.num_classes:  # the flag disagrees
        raise UsageError(f"--num-classes {args.num_classes} disagrees with --teacher {teacher.name}, which has "
                         f"{count} classes{f' as the data {root!r} has' if classes else ''}; drop "
                         f"--num-classes or pass --num-classes {count}.")
    data = f"the data '{root}' {len(classes)} class folders" if classes else f"--num-classes is {args.num_classes}"
    known = teacher_class_names(teacher.label_names, count) if classes else None
    if known is None:
        raise UsageError(f"--teacher {teacher.name} has {count} classes and {data}; distil on data of the teacher's "
                         "classes, or train a teacher on these.")
    indices, unknown = match_teacher_classes(classes, known)
    if unknown and count == len(classes):
        raise UsageError(f"--teacher {teacher.name} knows other classes than the class folders of '{root}' (it does "
                         f"not know {_preview(unknown)}; its classes are {known.source}); distil on data of its "
                         "classes, or pass another teacher.")
    if unknown:
        raise UsageError(f"--teacher {teacher.name} has {count} classes and {data}, {len(unknown)} of which it does "
                         f"not know ({_preview(unknown)}; its classes are {known.source}); distil on data of the "
                         "teacher's classes, or train a teacher on these.")
    if args.num_classes != len(classes):
        raise UsageError(f"--num-classes {args.num_classes}: the teacher is distilled on the {len(classes)} class "
                         f"folders of '{root}', so the student has as many classes; drop --num-classes.")
    if utils.is_primary(args):
        which = (f"its classes in the order of the class folders of '{root}'" if count == len(classes) else
                 f"the {len(classes)} of them the class folders of '{root}' name")
        _logger.info(f"--teacher {teacher.name} has {count} classes ({known.source}): distilling on {which} "
                     f"({describe_mapping(classes, indices)}).")
    return indices


def check_batch_of_one(model: nn.Module, img_size: Tuple[int, int]) -> None:
    """Refuse ``-b 1`` for a model whose BatchNorm sees a 1x1 map: one value per channel, which it cannot normalise
    in training (torch fails on the first step). One forward of a zero image in eval mode finds the sizes."""
    seen = {}

    def record(name: str):
        def hook(_module, inputs, _output) -> None:
            seen.setdefault(name, inputs[0].shape)
        return hook

    hooks = [m.register_forward_hook(record(name))
             for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    param = next(model.parameters(), None)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, int(getattr(model, 'in_chans', 3)), *img_size,
                              device=param.device if param is not None else None))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    single = [name for name, shape in seen.items() if shape[2:].numel() == 1]
    if single:
        raise UsageError(f"-b 1: BatchNorm '{single[0]}' of {type(model).__name__} sees a 1x1 map at "
                         f"{img_size[0]}x{img_size[1]}, one value per channel, which it cannot normalise in training; "
                         "use -b 2 or more, or a larger --img-size.")


def check_normalisation(data_config, in_chans: int, model_name: str) -> None:
    """The mean and std the loader normalises with have one entry per input channel (a 1-channel model keeps the
    3-entry ImageNet statistics of its pretrained_cfg, which the loader cannot apply)."""
    for key in ('mean', 'std'):
        if len(data_config[key]) != in_chans:
            raise UsageError(
                f"--in-chans {in_chans}: the {key} of {model_name} has {len(data_config[key])} entries "
                f"({', '.join(f'{v:g}' for v in data_config[key])}); pass --mean and --std with {in_chans} value(s) "
                f"each, e.g. --mean {' '.join(['0.5'] * in_chans)} --std {' '.join(['0.25'] * in_chans)}.")
