"""A whole training run from timm train.py's parsed flags: checks, models, data, the task, the epochs, the run
folder, the checkpoints and the exported model folder.

``--distill none`` trains a plain model with timm's ClassificationTask (that is how teachers are trained); any other
method builds ``create_distill_task(...)`` with a frozen teacher loaded from ``--teacher-checkpoint``, from a model
folder (``--teacher local-dir:<folder>``) or from the hub with ``--teacher-pretrained``. The output folder is
timm's: ``<output>/<experiment>/`` with args.yaml, summary.csv, last.pth.tar, model_best.pth.tar (readable by
``timm.task.resume_task_checkpoint``) and model/, the student at its best epoch as a timm model folder
(``timm.create_model('local-dir:<output>/<experiment>/model', pretrained=True)``; see
`timm_sadistill.training.export`). Distributed: only rank 0 writes files.

`train` takes the flags together with what the command line derives from them (``timm_sadistill.cli.train``): the
teacher ``--teacher`` names, its weights checked, and the task's keyword arguments.
"""
import argparse
import logging
import os
from contextlib import nullcontext, suppress
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from timm import utils
from timm.data import resolve_data_config
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import create_model
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.task import ClassificationTask, TrainingTask, load_task_ema_checkpoint, resume_task_checkpoint
from timm.utils import NativeScaler, get_state_dict, unwrap_model
import yaml

from .._atomic import atomic_write, remove_partial_writes, save_safetensors_atomic
from .._checkpoint_checks import check_checkpoint_readable, load_checkpoint, state_dict_mismatch
from .._device_and_size_checks import check_device, check_img_size
from ..errors import UsageError
from ..features import check_input_size, default_img_size, input_size_kwargs
from ..losses import default_distill_loss, get_distill_loss_class, list_distill_losses, loss_options
from ..model_folder import ModelName, check_pretrained_available, resolve_model_name
from ..tasks import create_distill_task
from .checkpoint_saver import AtomicCheckpointSaver
from .run_checks import check_batch_of_one, check_classes, check_normalisation, check_train_flags
from .data_loading import create_datasets, create_loaders
from .export import export_student, exported_epoch, label_names_of
from .loop import RunOutputs, Training, train_epochs, validate
from .resume_checks import check_resume_distill, check_resume_matches, read_resume_checkpoint
from .run_folder import (
    check_experiment, check_output_path, continue_hint, create_run_folder, disk_full_is_usage_error, summary_row,
    trim_summary,
)
from .run_name import timestamp_name

__all__ = ['train', 'RECORDED_ARGS']

_logger = logging.getLogger('timm_sadistill.train')

# a test-only hook for the torchrun test, whose ranks are subprocesses: every rank writes its final student state to
# <dir>/rank<k>.safetensors
DUMP_PARAMS_ENV = 'TSD_TEST_DUMP_PARAMS'

# what a distillation run records beside its flags (args.yaml, the checkpoints' args): derived from them, not flags
RECORDED_ARGS = ('distill_options', 'distill_stages_resolved', 'teacher_stages_resolved', 'teacher_classes')


@dataclass
class _Request:
    """What a run is asked to do: the flags (``args_text``, their YAML, goes into args.yaml), the command line (for
    the model card), the task's keyword arguments and the flags of the run that ``--resume`` continues."""
    args: argparse.Namespace
    args_text: str
    command: Optional[str]
    task_kwargs: Dict[str, Any]
    saved_args: Optional[argparse.Namespace]


def _drawn_maps_words() -> str:
    """The refusal of --save-attention-maps for a method whose maps are not drawn, naming those that are."""
    drawn = list_distill_losses(lambda cls: cls.draws_attention_maps)
    return (f"--save-attention-maps draws {' and '.join(name.upper() for name in drawn)}'s attention maps; use it "
            f"with --distill {' or '.join(drawn)}.")


def _check_distill_args(args: argparse.Namespace) -> ModelName:
    """Refuse inconsistent model/teacher flags before anything is loaded; what ``--model`` names."""
    student = resolve_model_name(args.model, '--model', allow_download=args.pretrained, download_option='--pretrained')
    if args.pretrained and not student.has_weights and ':' not in args.model:
        check_pretrained_available(args.model, '--pretrained')
    if args.distill == 'none':
        default = default_distill_loss()
        methods = f"--distill {default} (or {', '.join(m for m in list_distill_losses() if m != default)})"
        if args.teacher or args.teacher_checkpoint:
            raise UsageError(f"--teacher/--teacher-checkpoint need a method: add {methods}.")
        if args.teacher_amp_dtype or args.teacher_compile:  # without a teacher they would be ignored
            raise UsageError(f"--teacher-amp-dtype/--teacher-compile apply to a teacher: add {methods} and --teacher, "
                             "or drop them.")
        if args.save_attention_maps:
            raise UsageError(_drawn_maps_words())
        return student
    if not args.teacher:
        raise UsageError(f"--distill {args.distill} needs a teacher: add --teacher NAME --teacher-checkpoint FILE.")
    if args.kd_temperature is not None and 'temperature' not in loss_options(args.distill).defaults:
        raise UsageError(f"--kd-temperature does not apply to --distill {args.distill}; drop it.")
    if args.save_attention_maps:
        if not get_distill_loss_class(args.distill).draws_attention_maps:
            raise UsageError(_drawn_maps_words())
        from ..attention_maps import require_matplotlib
        require_matplotlib()  # before training, not after it
    return student


def _create_student(args: argparse.Namespace, student: ModelName, in_chans: int, img_size) -> nn.Module:
    """The student as timm's train.py builds it; a model folder (``--model local-dir:``) brings its weights and
    preprocessing, and keeps its head when the class count is its own."""
    if student.has_weights and student.num_classes not in (None, args.num_classes) and utils.is_primary(args):
        _logger.info(f"--model {args.model}: its {student.num_classes}-class head is replaced by a new "
                     f"{args.num_classes}-class one; the rest of its weights load.")
    try:
        model = create_model(  # a ViT student is built for the training size
            student.load_name, pretrained=args.pretrained or student.has_weights, in_chans=in_chans,
            num_classes=args.num_classes, drop_rate=args.drop, drop_path_rate=args.drop_path,
            drop_block_rate=args.drop_block, global_pool=args.gp, bn_momentum=args.bn_momentum, bn_eps=args.bn_eps,
            checkpoint_path=args.initial_checkpoint or None,
            **input_size_kwargs(student.architecture, img_size), **args.model_kwargs,
        )
    except RuntimeError as e:
        if not args.initial_checkpoint or 'state_dict' not in str(e):
            raise
        raise UsageError(f"--initial-checkpoint '{args.initial_checkpoint}' does not fit --model {args.model} with "
                         f"{args.num_classes} classes; pass a checkpoint of that architecture and class count. "
                         f"Details: {state_dict_mismatch(e)}") from None
    return model


def _create_train_loss(args: argparse.Namespace, mixup_active: bool, device: torch.device) -> nn.Module:
    """timm train.py's choice of training loss (``--bce-loss`` replaces cross-entropy when there is smoothing or
    mixup, as there)."""
    bce_kwargs = dict(target_threshold=args.bce_target_thresh, sum_classes=args.bce_sum, pos_weight=args.bce_pos_weight)
    if mixup_active:  # smoothing is part of the mixup targets
        loss = BinaryCrossEntropy(**bce_kwargs) if args.bce_loss else SoftTargetCrossEntropy()
    elif args.smoothing:
        if args.bce_loss:
            loss = BinaryCrossEntropy(smoothing=args.smoothing, **bce_kwargs)
        else:
            loss = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        if args.bce_loss:  # same flags, same loss as timm's train.py, which takes BCE only with smoothing or mixup
            _logger.warning("--bce-loss has no effect without --smoothing or mixup/cutmix (as in timm's train.py): "
                            "training with cross-entropy.")
        loss = nn.CrossEntropyLoss()
    return loss.to(device=device)


def _create_task(args, model, train_loss, device, data_config, task_kwargs: Dict[str, Any]) -> TrainingTask:
    if args.distill == 'none':
        return ClassificationTask(model, criterion=train_loss, device=device, verbose=utils.is_primary(args))
    # the loader normalises with data_config's statistics (--mean/--std, else the model's): the teacher's input is
    # renormalised from those, not from the student's pretrained_cfg
    return create_distill_task(
        args.distill, model, args.teacher, criterion=train_loss, img_size=tuple(data_config['input_size'][1:]),
        input_mean=data_config['mean'], input_std=data_config['std'],
        distill_loss_weight=args.distill_loss_weight, task_loss_weight=args.task_loss_weight,
        teacher_classes=args.teacher_classes, device=device, verbose=utils.is_primary(args), **task_kwargs,
    )


def _record_distill_choices(args: argparse.Namespace, task: TrainingTask) -> str:
    """Set `RECORDED_ARGS` on ``args`` (so the checkpoints hold them) and return them as args.yaml lines: every
    option of the loss as it was built (defaults spelled out), the stage names ``auto`` resolved to and the teacher's
    class of each class folder (`check_classes`: None for a teacher of the data's classes)."""
    if args.distill == 'none':
        return ''
    # the stages the stage flags name: the pair of the maps the heads take, last when the loss takes it, follows
    # from the loss's options, so that --distill-stages given the recorded names builds the same task
    named = len(task.student_stages) - (1 if task.distill_loss.head_maps else 0)
    recorded = dict(
        distill_options=dict(task.distill_loss.option_values),
        distill_stages_resolved=[s.name for s in task.student_stages[:named]],
        teacher_stages_resolved=[t.name for t in task.teacher_stages[:named]],
        teacher_classes=task.teacher_classes,
    )
    vars(args).update(recorded)
    return yaml.safe_dump(recorded, default_flow_style=False)


def _log_teacher_accuracy(task, loader_eval, args, device, amp_autocast) -> None:
    """Log the teacher's validation top-1, over the logits it is distilled with (`DistillTask.teacher_outputs`: those
    of the data's classes for a teacher that knows more, in its autocast dtype): a teacher that does not know the task
    cannot teach it."""
    def predict(input: torch.Tensor) -> torch.Tensor:
        return task.teacher_outputs(task.teacher_input(input))[0]

    metrics = validate(predict, loader_eval, args, device, amp_autocast, log_name='Teacher')
    if utils.is_primary(args):
        _logger.info(f"Teacher {args.teacher} top-1 on '{args.val_split}': {metrics['top1']:.2f}%")


def _save_attention_maps(task, loader, output_dir: str) -> None:
    """The teacher's and the student's maps for the first images of ``loader``, as attention_maps.png."""
    from ..attention_maps import save_attention_maps
    _logger.info(f'Attention maps written to {save_attention_maps(task, loader, output_dir)}')


def _dump_rank_params(task: TrainingTask, args: argparse.Namespace) -> None:
    """Test-only (TSD_TEST_DUMP_PARAMS): every rank writes its final student state for a cross-rank comparison."""
    folder = os.environ.get(DUMP_PARAMS_ENV)
    if folder:
        os.makedirs(folder, exist_ok=True)
        save_safetensors_atomic(get_state_dict(task.get_eval_model(), unwrap_model),
                                os.path.join(folder, f'rank{args.rank}.safetensors'))


def train(
        args: argparse.Namespace,
        args_text: str,
        *,
        teacher: Optional[ModelName],
        task_kwargs: Dict[str, Any],
        command: Optional[str] = None,
) -> Dict[str, Any]:
    """Run the whole training; returns ``{'output_dir', 'best_metric', 'best_epoch'}`` (output_dir None off rank 0).

    Args:
        args: timm train.py's flags and ours, as ``timm_sadistill.cli.train.parse_args`` reads them.
        args_text: ``args`` as YAML, for args.yaml (the run adds what it records, `RECORDED_ARGS`).
        teacher: what ``--teacher`` names, its weights checked (``cli.distill_flags.check_teacher_flags``), so that
            its classes are checked against the data before a model is built; None without a method.
        task_kwargs: ``create_distill_task``'s keyword arguments from the flags: the teacher's weights, the stages,
            the loss's options (``cli.distill_flags.distill_task_kwargs``); not read without a method.
        command: the command line of the run, for the exported model card.
    """
    student = _check_distill_args(args)
    check_train_flags(args)
    args.prefetcher = not args.no_prefetcher
    args.grad_accum_steps = max(1, args.grad_accum_steps)
    saved_args = None
    if args.resume:
        saved_args = read_resume_checkpoint(args.resume, args.output or './output/train')
        check_resume_matches(args.resume, saved_args, args)
    if args.initial_checkpoint:  # before anything is created or written: a bad file must not cost the output folder
        check_checkpoint_readable(args.initial_checkpoint, '--initial-checkpoint checkpoint')
    check_experiment(args.experiment)
    check_output_path(args.output or './output/train')
    check_device('--device', args.device)
    device = utils.init_distributed_device(args)
    try:
        return _train_on_device(_Request(args, args_text, command, task_kwargs, saved_args), device, student, teacher)
    finally:
        if args.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train_on_device(
        request: _Request,
        device: torch.device,
        student: ModelName,
        teacher: Optional[ModelName],
) -> Dict[str, Any]:
    args = request.args
    if args.distributed:
        _logger.info(f'Distributed training: process {args.rank} of {args.world_size}, device {args.device}.')
    utils.random_seed(args.seed, args.rank)

    in_chans = args.in_chans or (args.input_size[0] if args.input_size else 3)
    img_size = tuple(args.input_size[-2:]) if args.input_size else check_img_size(args.img_size)
    # the data first: its class folders set the head, and every check of teacher against data runs before a model
    datasets = create_datasets(args, in_chans)
    check_classes(args, datasets[0], student, teacher)
    model = _create_student(args, student, in_chans, img_size)
    check_input_size(model, img_size or default_img_size(model), option='--img-size', role=f'student {args.model}')
    if args.batch_size == 1:
        check_batch_of_one(model, img_size or default_img_size(model))
    if args.head_init_scale is not None:
        with torch.no_grad():
            model.get_classifier().weight.mul_(args.head_init_scale)
            model.get_classifier().bias.mul_(args.head_init_scale)
    if args.head_init_bias is not None:
        nn.init.constant_(model.get_classifier().bias, args.head_init_bias)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    if args.num_classes is None:
        args.num_classes = model.num_classes
    data_config = resolve_data_config(vars(args), model=model, verbose=utils.is_primary(args))
    check_normalisation(data_config, in_chans, args.model)

    # the run folder and its lock come before any heavy work (the teacher, its validation, a resumed checkpoint), so
    # that a second run into the same folder stops at once; a setup that fails after this removes the new folder
    run = None
    if utils.is_primary(args):
        run = create_run_folder(args.output or './output/train', args.experiment,
                                timestamp_name(args.model, data_config['input_size'][-1]), args.resume)
    try:
        with disk_full_is_usage_error(run.path, args.experiment) if run is not None else nullcontext():
            return _train_in_folder(request, device, model, data_config, datasets, run.path if run else None)
    except KeyboardInterrupt:
        if run is None:
            raise
        remove_partial_writes(run.path)
        raise KeyboardInterrupt(f"'{run.path}': {continue_hint(run.path, args.experiment)}.") from None
    finally:
        if run is not None:
            run.release()


def _train_in_folder(
        request: _Request,
        device: torch.device,
        model: nn.Module,
        data_config: Dict[str, Any],
        datasets: Tuple[Any, Any],
        run_path: Optional[str],
) -> Dict[str, Any]:
    """The run from its data to its last epoch: the datasets are (train, eval); ``run_path`` is the run folder (None
    off rank 0, which writes nothing)."""
    args = request.args
    training, args_text = _create_training(request, device, model, data_config, datasets)
    resume_epoch = _load_state(training, args)
    eval_metric = args.eval_metric if training.loader_eval is not None else 'loss'
    outputs = None
    if run_path is not None:
        export = partial(export_student, training.task, args, run_path, data_config=data_config,
                         label_names=label_names_of(datasets[0], args.num_classes), command=request.command)
        outputs = _create_outputs(run_path, training, args, eval_metric == 'loss', export)
    start_epoch, num_epochs = _create_schedule(training, args, eval_metric == 'loss', resume_epoch)

    task, loader_train, loader_eval = training.task, training.loader_train, training.loader_eval
    output_dir, saver = (outputs.path, outputs.saver) if outputs is not None else (None, None)
    if args.resume and start_epoch >= num_epochs:
        _log_nothing_to_train(args, start_epoch, num_epochs)
        best_metric, best_epoch = (saver.best_metric, saver.best_epoch) if saver is not None else (None, None)
        return {'output_dir': output_dir, 'best_metric': best_metric, 'best_epoch': best_epoch}
    _prepare_task(training, args, device)
    if utils.is_primary(args):
        # replaced, not written through (a symlink there is replaced too)
        with atomic_write(os.path.join(output_dir, 'args.yaml'), pause=False) as tmp_path:
            with open(tmp_path, 'w') as f:
                f.write(args_text)
        _logger.info(f'Training epochs {start_epoch}..{num_epochs - 1}, output in {output_dir}')
        trim_summary(os.path.join(output_dir, 'summary.csv'), start_epoch)

    best_metric, best_epoch = train_epochs(training, args, device, range(start_epoch, num_epochs), eval_metric,
                                            outputs)
    if best_metric is not None:
        _logger.info(f'*** Best metric: {best_metric} (epoch {best_epoch})')
    if args.save_attention_maps and saver is not None:
        _save_attention_maps(task, loader_eval if loader_eval is not None else loader_train, output_dir)
    _dump_rank_params(task, args)
    return {'output_dir': output_dir, 'best_metric': best_metric, 'best_epoch': best_epoch}


def _create_training(
        request: _Request,
        device: torch.device,
        model: nn.Module,
        data_config: Dict[str, Any],
        datasets: Tuple[Any, Any],
) -> Tuple[Training, str]:
    """The student on the device, the precision, the loaders, the task and the optimizer (the schedule comes later:
    `_create_schedule`); and the args.yaml text with the task's choices (`_record_distill_choices`)."""
    args = request.args
    amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    model.to(device=device)
    if args.distributed and args.sync_bn:  # the student only: the frozen teacher has no batch statistics to share
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)

    amp_autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype) if args.amp else suppress
    loss_scaler = NativeScaler(device=device.type) if args.amp and device.type == 'cuda' and amp_dtype == torch.float16 else None

    loader_train, loader_eval, mixup_fn, mixup_active = create_loaders(args, data_config, *datasets, device)
    train_loss = _create_train_loss(args, mixup_active, device)
    task = _create_task(args, model, train_loss, device, data_config, request.task_kwargs)
    args_text = request.args_text + _record_distill_choices(args, task)
    if args.resume:
        check_resume_distill(args.resume, request.saved_args, args)
    task.to(device)
    if args.channels_last:  # the student, its connectors and the teacher: the loss compares their features
        task.to(memory_format=torch.channels_last)

    if not args.lr:  # timm's rule: scale lr_base by the global batch size
        batch_ratio = args.batch_size * args.world_size * args.grad_accum_steps / args.lr_base_size
        if not args.lr_base_scale:
            args.lr_base_scale = 'sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear'
        args.lr = args.lr_base * (batch_ratio ** 0.5 if args.lr_base_scale == 'sqrt' else batch_ratio)
    # the trainable module holds the student and the loss's connectors, so both train
    optimizer = create_optimizer_v2(task.get_trainable_module(), **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    training = Training(task, optimizer, amp_autocast, loss_scaler, loader_train, loader_eval, mixup_fn)
    return training, args_text


def _load_state(training: Training, args: argparse.Namespace) -> Optional[int]:
    """Load ``--resume`` into the task (and, without ``--no-resume-opt``, into the optimizer and the loss scaler),
    and set up the EMA (from the checkpoint when resuming); the epoch the checkpoint ends (None: a new run)."""
    task, resume_epoch = training.task, None
    if args.resume:
        resume_epoch = resume_task_checkpoint(
            task, args.resume, optimizer=None if args.no_resume_opt else training.optimizer,
            loss_scaler=None if args.no_resume_opt else training.loss_scaler, log_info=utils.is_primary(args),
        )
    if args.model_ema:  # after moving to the device, before DDP, as in timm
        task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)
        if args.resume:
            load_task_ema_checkpoint(task, args.resume)
    return resume_epoch


def _create_outputs(
        path: str,
        training: Training,
        args: argparse.Namespace,
        decreasing_metric: bool,
        export: Callable[..., None],
) -> RunOutputs:
    """The checkpoint saver of the run folder ``path``; resuming into it, the saver goes on ranking its checkpoints
    and an export that a stopped run left behind its best checkpoint is redone."""
    task = training.task
    saver = AtomicCheckpointSaver(
        model=task.get_trainable_module(), optimizer=training.optimizer, args=args, amp_scaler=training.loss_scaler,
        checkpoint_dir=path, recovery_dir=path, decreasing=decreasing_metric, max_history=args.checkpoint_hist,
        task=task,
    )
    if args.resume and os.path.dirname(os.path.abspath(args.resume)) == os.path.abspath(path):
        saver.load_state_dict_from_checkpoint(args.resume)  # keep ranking checkpoints as before the restart
        if _refresh_export(task, path, export):
            _reload(task, args.resume)  # the export loaded the best epoch; training goes on from the last
    return RunOutputs(path, saver, export)


def _create_schedule(
        training: Training,
        args: argparse.Namespace,
        decreasing_metric: bool,
        resume_epoch: Optional[int],
) -> Tuple[int, int]:
    """timm's LR schedule (set on ``training``), replayed up to the first epoch to train; (that epoch, the number of
    epochs)."""
    updates_per_epoch = (len(training.loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    lr_scheduler, num_epochs = create_scheduler_v2(
        training.optimizer, **scheduler_kwargs(args, decreasing_metric=decreasing_metric),
        updates_per_epoch=updates_per_epoch,
    )
    start_epoch = args.start_epoch if args.start_epoch is not None else (resume_epoch or 0)
    if lr_scheduler is not None and start_epoch > 0:  # the schedule is a function of the epoch: replay it
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)
    training.lr_scheduler = lr_scheduler
    return start_epoch, num_epochs


def _log_nothing_to_train(args: argparse.Namespace, start_epoch: int, num_epochs: int) -> None:
    """Say that the ``--resume`` run has trained the epochs this command asks for, and how to train on."""
    done = f'has trained all {num_epochs} epochs' if start_epoch == num_epochs else \
        f'has trained {start_epoch} epochs, more than the {num_epochs} this command asks for'
    if utils.is_primary(args):
        _logger.info(f"--resume '{args.resume}' {done}: nothing to train (pass a larger --epochs to train on).")


def _prepare_task(training: Training, args: argparse.Namespace, device: torch.device) -> None:
    """Compile and distribute the task as the flags ask, and log the teacher's accuracy."""
    task = training.task
    if args.torchcompile:
        task.compile(backend=args.torchcompile)
        if task.has_ema():
            task.compile_ema(backend=args.torchcompile)
    if args.distributed:
        # pass broadcast_buffers only to turn it off: newer torch warns whenever it is given
        ddp_kwargs = {'broadcast_buffers': False} if args.no_ddp_bb else {}
        task.prepare_distributed(device_ids=[device] if device.type == 'cuda' else None, **ddp_kwargs)
    if args.distill != 'none' and training.loader_eval is not None:
        _log_teacher_accuracy(task, training.loader_eval, args, device, training.amp_autocast)


def _reload(task: TrainingTask, checkpoint: str) -> None:
    """Load ``checkpoint``'s student, connectors and EMA into ``task`` (not the optimizer)."""
    resume_task_checkpoint(task, checkpoint, log_info=False)
    if task.has_ema():
        load_task_ema_checkpoint(task, checkpoint)


def _eval_metrics_of(output_dir: str, epoch: int) -> Optional[Dict[str, float]]:
    """The validation top-1 and top-5 of ``epoch`` in the run's summary.csv; None without them."""
    row = summary_row(output_dir, epoch)
    if not row.get('eval_top1') or not row.get('eval_top5'):
        return None
    return {'top1': float(row['eval_top1']), 'top5': float(row['eval_top5'])}


def _refresh_export(task: TrainingTask, output_dir: str, export: Callable[..., None]) -> bool:
    """Export the best checkpoint again (``export(epoch, eval_metrics)``) when the run's exported student is not its
    export (a run stopped between saving a best epoch and exporting it, or while exporting); True when it exported."""
    best = next((os.path.join(output_dir, name) for name in ('model_best.pth.tar', 'last.pth.tar')
                 if os.path.isfile(os.path.join(output_dir, name))), None)
    if best is None:
        return False
    epoch = load_checkpoint(best).get('epoch')
    if epoch is None or exported_epoch(output_dir) == epoch:
        return False
    _logger.info(f"The exported student in '{output_dir}' is not that of '{best}' (epoch {epoch}): exporting it again.")
    _reload(task, best)
    export(epoch, eval_metrics=_eval_metrics_of(output_dir, epoch))
    return True
