"""The student a ``train`` run exports: ``<output>/<experiment>/model/`` (a timm model folder with its model card,
see `timm_sadistill.model_folder`) and, for one more release, the bare ``<output>/<experiment>/model.safetensors``."""
import argparse
import hashlib
import logging
import os
import shlex
import shutil
from functools import lru_cache
from typing import Any, Dict, List, Optional, Sequence

import timm
from timm.task import TrainingTask
from timm.utils import unwrap_model

from .._atomic import atomic_write, save_safetensors_atomic
from ..tasks.teacher_classes import describe_mapping
from .run_folder import summary_row
from ..model_folder import (
    CARD_FILE, CONFIG_FILE, MODEL_FOLDER_SUPPORTED, WEIGHTS_FILE, ModelCard, model_folder_of, model_folder_weights,
    save_model_folder,
)

__all__ = [
    'MODEL_FOLDER', 'LEGACY_WEIGHTS_FILE', 'export_student', 'exported_epoch', 'label_names_of', 'train_command_line',
]

_logger = logging.getLogger(__name__)

MODEL_FOLDER = 'model'
LEGACY_WEIGHTS_FILE = 'model.safetensors'  # the bare export before the model folder; kept for one release

# The timm train.py flags a reader of the card needs to judge and repeat the recipe, in the order shown.
RECIPE_FLAGS = (
    'epochs', 'batch_size', 'grad_accum_steps', 'opt', 'lr', 'weight_decay', 'sched', 'warmup_epochs', 'smoothing',
    'mixup', 'cutmix', 'aa', 'reprob', 'drop', 'drop_path', 'model_ema', 'model_ema_decay', 'amp', 'pretrained', 'seed',
)
HUB_DATASET_PREFIXES = ('hfds/', 'hfids/')  # timm's dataset types whose name is a Hugging Face Hub dataset id


@lru_cache(maxsize=None)
def _sha256(path: str) -> str:
    """Hex digest of a file, once per run (every best epoch re-exports the card)."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def train_command_line(argv: Sequence[str], world_size: int = 1) -> str:
    """The shell command of a ``train`` run with these arguments (under torchrun when it ran on several processes)."""
    launcher = f'torchrun --nproc_per_node={world_size} -m timm_sadistill train' if world_size > 1 else 'timm-sadistill train'
    return ' '.join([launcher, shlex.join(argv)]).strip()


def label_names_of(dataset, num_classes: int) -> Optional[List[str]]:
    """Class names in classifier order from an ImageFolder-style dataset (its class folders); None when unknown."""
    class_to_idx = getattr(getattr(dataset, 'reader', None), 'class_to_idx', None)
    if not class_to_idx or len(class_to_idx) != num_classes:
        return None
    return sorted(class_to_idx, key=class_to_idx.get)


def _teacher_details(task: TrainingTask, args: argparse.Namespace,
                     label_names: Optional[Sequence[str]]) -> Dict[str, Any]:
    """Teacher, where its weights came from and their sha256, and, for a teacher distilled on the data's classes
    among its own, each class and its class of the teacher."""
    folder = model_folder_of(args.teacher)
    weights = model_folder_weights(folder) if folder is not None else args.teacher_checkpoint
    if weights:
        source = f'`{weights}` (sha256 `{_sha256(weights)}`)'
    else:
        source = "the Hugging Face Hub (`--teacher-pretrained`)"
    details = {'Teacher': f'`{args.teacher}`', 'Teacher weights': source}
    indices = getattr(args, 'teacher_classes', None)
    if indices:
        of = getattr(unwrap_model(task.teacher.model), 'num_classes', '?')
        mapping = describe_mapping(label_names, indices, limit=None) if label_names else ', '.join(map(str, indices))
        details['Teacher classes'] = f'{len(indices)} of its {of} (class -> teacher class: {mapping})'
    return details


def _distill_details(task: TrainingTask, args: argparse.Namespace) -> Dict[str, Any]:
    """Method, stages, loss weights, every option of the loss as it was built (defaults included) and the task's
    notices (a term turned off for this pair, which the options show at 0)."""
    pairs = [f'{s.name} -> {t.name}' for s, t in zip(task.student_stages, task.teacher_stages)]
    details = {
        'Method': f'`--distill {args.distill}` (`{type(task).__name__}`)',
        'Stages (student -> teacher)': pairs or 'logits only',
        'Loss weights': {'task_loss_weight': task.task_loss_weight, 'distill_loss_weight': task.distill_loss_weight},
        'Distillation options': dict(task.distill_loss.option_values),
    }
    if task.notices:
        details['Notices'] = list(task.notices)
    return details


def _training_batch_details(output_dir: str, epoch: int) -> Dict[str, Any]:
    """The teacher's top-1 on the training batches of the exported epoch, and what a gate on the distillation term
    decided then (the loss's ``distill_gate`` report), from its summary.csv row."""
    row = summary_row(output_dir, epoch)
    details = {}
    if row.get('train_teacher_top1'):
        details['Teacher top-1 on the training batches'] = (
            f"{float(row['train_teacher_top1']):.1f}% (epoch {epoch}, as augmented; the share of the student's images "
            "whose label the teacher gets right)")
    if row.get('train_distill_gate'):
        details['Distillation gate'] = (
            f"on for {100 * float(row['train_distill_gate']):.0f}% of the training batches of epoch {epoch} (off: the "
            "teacher's running top-1 on them was not above the student's, which then trained on its labels alone)")
    return details


def _model_card(
        task: TrainingTask,
        args: argparse.Namespace,
        output_dir: str,
        epoch: int,
        data_config: Dict[str, Any],
        label_names: Optional[Sequence[str]],
        eval_metrics: Optional[Dict[str, float]],
        command: Optional[str],
) -> ModelCard:
    classes = f'{args.num_classes}' + (f" ({', '.join(label_names)})" if label_names else '')
    details: Dict[str, Any] = {'Architecture': f'`{args.model}`', 'Classes': classes}
    if args.distill != 'none':
        details.update(_teacher_details(task, args, label_names))
        details.update(_distill_details(task, args))
        details.update(_training_batch_details(output_dir, epoch))
        description = (f"A `{args.model}` student distilled from a `{args.teacher}` teacher with timm-sadistill "
                       f"(`--distill {args.distill}`).")
    else:
        description = f"A `{args.model}` trained with timm-sadistill (`--distill none`: timm's classification task)."
    details['Training (timm train.py flags)'] = {flag: getattr(args, flag) for flag in RECIPE_FLAGS}
    details['Processes'] = args.world_size
    details['Input'] = {k: data_config[k] for k in ('input_size', 'interpolation', 'crop_pct', 'mean', 'std')}
    # as the run ranks epochs: by the validation metric, or by the training loss without a validation split
    ranked_by = args.eval_metric if eval_metrics else 'training loss, without validation'
    details['Exported epoch'] = f'{epoch} (of epochs 0..{args.epochs - 1}; the best by {ranked_by}' + \
        (', EMA weights)' if task.has_ema() else ')')
    dataset = args.dataset or os.path.basename(os.path.normpath(args.data_dir or args.data or '')) or None
    hub_datasets = [args.dataset.split('/', 1)[1] for prefix in HUB_DATASET_PREFIXES if args.dataset.startswith(prefix)]
    metrics = {'top-1': eval_metrics['top1'], 'top-5': eval_metrics['top5']} if eval_metrics else {}
    tags = ['timm-sadistill'] + (['knowledge-distillation', f'distill-{args.distill}'] if args.distill != 'none' else [])
    return ModelCard(
        name=args.experiment or args.model, description=description, details=details, metrics=metrics,
        dataset=dataset, split=args.val_split if eval_metrics else None, hub_datasets=hub_datasets, tags=tags,
        command=command,
    )


def export_student(
        task: TrainingTask,
        args: argparse.Namespace,
        output_dir: str,
        epoch: int,
        data_config: Dict[str, Any],
        label_names: Optional[Sequence[str]] = None,
        eval_metrics: Optional[Dict[str, float]] = None,
        command: Optional[str] = None,
) -> None:
    """Write the student of ``epoch`` (EMA weights when EMA is ranked) as ``<output_dir>/model/`` and as the legacy
    ``<output_dir>/model.safetensors``; ``eval_metrics`` (top1, top5) and ``command`` go into the model card."""
    model = unwrap_model(task.get_eval_model(ema=task.has_ema()))
    # the architecture, also for a student started from a model folder (--model local-dir:...)
    arch = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or args.model
    metadata = {'arch': arch, 'num_classes': str(args.num_classes), 'epoch': str(epoch), 'format': 'pt'}
    legacy_path = os.path.join(output_dir, LEGACY_WEIGHTS_FILE)
    if not MODEL_FOLDER_SUPPORTED:
        _logger.warning(f"timm {timm.__version__} cannot write the model folder (timm >= 1.0.29 can); "
                        f"only {LEGACY_WEIGHTS_FILE} is written.")
        save_safetensors_atomic(model.state_dict(), legacy_path, metadata)
        return
    card = _model_card(task, args, output_dir, epoch, data_config, label_names, eval_metrics, command)
    folder = save_model_folder(model, os.path.join(output_dir, MODEL_FOLDER), data_config, label_names, card, metadata)
    with atomic_write(legacy_path) as tmp_path:
        shutil.copyfile(os.path.join(folder, WEIGHTS_FILE), tmp_path)


def _weights_epoch(path: str) -> Optional[str]:
    """The ``epoch`` in the safetensors header of an export, None if the file is missing or unreadable."""
    from safetensors import safe_open
    try:
        with safe_open(path, framework='pt') as f:
            return (f.metadata() or {}).get('epoch')
    except Exception:  # missing, truncated: not an export of any epoch
        return None


def exported_epoch(output_dir: str) -> Optional[int]:
    """The epoch whose student ``export_student`` wrote in ``output_dir``, None unless every exported file is there
    and they agree (``model/``, written as a unit, and the legacy weights, a copy of its weights written after it)."""
    legacy = _weights_epoch(os.path.join(output_dir, LEGACY_WEIGHTS_FILE))
    if MODEL_FOLDER_SUPPORTED:
        folder = os.path.join(output_dir, MODEL_FOLDER)
        if not all(os.path.isfile(os.path.join(folder, name)) for name in (CONFIG_FILE, CARD_FILE)):
            return None
        if _weights_epoch(os.path.join(folder, WEIGHTS_FILE)) != legacy:
            return None
    return int(legacy) if legacy is not None and legacy.isdigit() else None
