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
from timm import utils
from timm.data import Mixup, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import create_model, is_model, safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.task import ClassificationTask, TrainingTask, load_task_ema_checkpoint, resume_task_checkpoint
from timm.utils import NativeScaler, get_state_dict, unwrap_model

from .._checkpoint_checks import check_checkpoint_readable
from ..losses import loss_options
from ..tasks import create_distill_task, guard_finite_loss
from .atomic_save import AtomicCheckpointSaver, save_safetensors_atomic
from .data import add_data_arguments, create_datasets, create_loaders
from .distill_options import add_distill_arguments, check_teacher_flags, distill_task_kwargs
from .errors import UsageError
from .progress import ProgressBar
from .timm_flags import add_timm_arguments

__all__ = ['build_parser', 'parse_args', 'train', 'train_one_epoch', 'validate', 'main']

_logger = logging.getLogger('timm_sadistill.train')

DUMP_PARAMS_ENV = 'TSD_TEST_DUMP_PARAMS'

# ----------------------------------------------------------------------------------------------------------------
# Arguments: timm's train.py flags, the distillation flags, the loop's own


def build_parser() -> Tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """(config parser, main parser): the first reads only ``-c/--config``, whose YAML sets the second's defaults."""
    config_parser = argparse.ArgumentParser(description='Training Config', add_help=False)
    config_parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                               help='YAML config file specifying default arguments')
    parser = argparse.ArgumentParser(
        prog='timm-sadistill train', parents=[config_parser], allow_abbrev=False,
        description='Train a timm model, optionally distilling a teacher into it (timm train.py flags).',
    )
    add_timm_arguments(parser)
    add_distill_arguments(parser)
    add_data_arguments(parser)
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
    check_teacher_flags(args.teacher, args)
    if args.kd_temperature is not None and 'temperature' not in loss_options(args.distill).defaults:
        raise UsageError(f"--kd-temperature does not apply to --distill {args.distill}; drop it.")
    if args.save_attention_maps:
        if args.distill != 'sa':
            raise UsageError("--save-attention-maps draws SA's attention maps; use it with --distill sa.")
        from ..viz import require_matplotlib
        require_matplotlib()  # before training, not after it


# ----------------------------------------------------------------------------------------------------------------
# Task


def _create_train_loss(args: argparse.Namespace, mixup_active: bool, device: torch.device) -> nn.Module:
    if mixup_active:  # smoothing is part of the mixup targets
        loss = SoftTargetCrossEntropy()
    elif args.smoothing:
        loss = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        loss = nn.CrossEntropyLoss()
    return loss.to(device=device)


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


# ----------------------------------------------------------------------------------------------------------------
# Train and evaluate


def _scalar_terms(result: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The task's loss and each named loss term (every scalar tensor of its result)."""
    return {k: v.detach().float() for k, v in result.items() if torch.is_tensor(v) and v.ndim == 0}


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
            if not guard_finite_loss(task, result, input, target, skip=args.skip_nonfinite,
                                     where=f'epoch {epoch}, batch {batch_idx}', all_ranks=args.distributed):
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

    dataset_train, dataset_eval = create_datasets(args, data_config)
    loader_train, loader_eval, mixup_fn, mixup_active = create_loaders(args, data_config, dataset_train, dataset_eval, device)
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
