"""timm's training loop over a task: the epochs of a run (`train_epochs`: train, validate, checkpoint and export each),
one epoch (`train_one_epoch`) and the validation pass (`validate`: top-1, top-5 and loss, over ranks)."""
import argparse
import logging
import os
import sys
import time
from collections import OrderedDict
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from timm import utils
from timm.data import Mixup
from timm.task import TrainingTask
from timm.utils import NativeScaler

from ..errors import UsageError
from ..tasks import guard_finite_loss
from .checkpoint_saver import AtomicCheckpointSaver
from .export import LEGACY_WEIGHTS_FILE
from .progress import ProgressBar
from .run_folder import append_summary

__all__ = ['Training', 'RunOutputs', 'seed_epoch', 'train_epochs', 'train_one_epoch', 'validate']

_logger = logging.getLogger('timm_sadistill.train')

# a prime well above any rank count, so that (epoch, rank) pairs of one run never share a seed
_EPOCH_SEED_STRIDE = 1_000_003


@dataclass
class Training:
    """What the epochs drive: the task, its optimizer and schedule, the precision and the loaders."""
    task: TrainingTask
    optimizer: torch.optim.Optimizer
    amp_autocast: Callable
    loss_scaler: Optional[NativeScaler]
    loader_train: Any
    loader_eval: Optional[Any]
    mixup_fn: Optional[Mixup]
    lr_scheduler: Any = None


@dataclass
class RunOutputs:
    """What rank 0 writes in the run folder ``path``: the checkpoints (``saver``) and the student of an epoch
    (``export(epoch, eval_metrics)``)."""
    path: str
    saver: AtomicCheckpointSaver
    export: Callable[..., None]


def _scalar_terms(result: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The task's loss and each named loss term (every scalar tensor of its result)."""
    return {k: v.detach().float() for k, v in result.items() if torch.is_tensor(v) and v.ndim == 0}


def _batch_on_device(
        input: torch.Tensor,
        target: torch.Tensor,
        args: argparse.Namespace,
        device: torch.device,
        mixup_fn: Optional[Mixup] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """A batch on ``device`` in the layout of ``--channels-last``, mixed by ``mixup_fn``; the prefetching loader
    has done the moving and the mixing itself."""
    if not args.prefetcher:
        input, target = input.to(device), target.to(device)
        if mixup_fn is not None:
            input, target = mixup_fn(input, target)
    if args.channels_last:
        input = input.contiguous(memory_format=torch.channels_last)
    return input, target


def _turn_off_mixup(epoch: int, loader, mixup_fn: Optional[Mixup], args: argparse.Namespace) -> None:
    """From ``--mixup-off-epoch`` on, no mixup (in the prefetching loader, or in ``mixup_fn``)."""
    if args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        if args.prefetcher and getattr(loader, 'mixup_enabled', False):
            loader.mixup_enabled = False
        elif mixup_fn is not None:
            mixup_fn.mixup_enabled = False


def _backward(
        task: TrainingTask,
        loss: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        args: argparse.Namespace,
        loss_scaler: Optional[NativeScaler],
        need_update: bool,
) -> None:
    """The backward pass of ``loss`` (already divided over the accumulated micro-batches) and, on the micro-batch that
    updates, the clipped optimizer step, as timm's train.py takes them."""
    clip_parameters = (
        task.get_clip_parameters(exclude_head='agc' in args.clip_mode) if args.clip_grad is not None else None
    )
    if loss_scaler is not None:
        loss_scaler(loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                    parameters=clip_parameters, need_update=need_update)
    else:
        loss.backward()
        if need_update:
            if args.clip_grad is not None:
                utils.dispatch_clip_grad(clip_parameters, value=args.clip_grad, mode=args.clip_mode)
            optimizer.step()


def _mean_terms(
        term_sums: Dict[str, torch.Tensor],
        num_samples: int,
        device: torch.device,
        distributed: bool,
) -> 'OrderedDict[str, float]':
    """The mean of each summed term over the samples of every rank, the loss first."""
    names = sorted(term_sums, key=lambda k: (k != 'loss', k))
    totals = torch.stack([term_sums[k] for k in names] + [torch.tensor(float(num_samples), device=device)]) \
        if names else torch.tensor([float(num_samples)], device=device)
    if distributed:
        dist.all_reduce(totals)
    count = max(totals[-1].item(), 1.0)
    return OrderedDict((name, totals[i].item() / count) for i, name in enumerate(names))


def _log_update(
        epoch: int,
        update_idx: int,
        updates_per_epoch: int,
        loss: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        rate: float,
) -> None:
    """timm's progress line of an update: the loss, the samples per second over every rank, the mean learning rate."""
    lr = sum(g['lr'] for g in optimizer.param_groups) / len(optimizer.param_groups)
    _logger.info(f'Train: {epoch} [{update_idx:>4d}/{updates_per_epoch}]  Loss: {loss.item():#.4g}  '
                 f'{rate:>7.2f} samples/s  LR: {lr:.3e}')


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
    _turn_off_mixup(epoch, loader, mixup_fn, args)
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
        input, target = _batch_on_device(input, target, args, device, mixup_fn)

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
                _backward(task, loss / accum_steps if accum_steps > 1 else loss, optimizer, args, loss_scaler,
                          need_update)
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
            rate = (batch_idx + 1) * input.shape[0] * args.world_size / max(time.time() - start, 1e-9)
            _log_update(epoch, update_idx, updates_per_epoch, loss, optimizer, rate)
    if progress is not None:
        progress.close()

    metrics = _mean_terms(term_sums, num_samples, device, args.distributed)
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
        input, target = _batch_on_device(input, target, args, device)
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


def train_epochs(
        training: Training,
        args: argparse.Namespace,
        device: torch.device,
        epochs: range,
        eval_metric: str,
        outputs: Optional[RunOutputs],
) -> Tuple[Optional[float], Optional[int]]:
    """Train, validate, checkpoint and export each of ``epochs``, ranked by ``eval_metric``; (best metric, its
    epoch), None off rank 0."""
    best_metric = best_epoch = None
    for epoch in epochs:
        seed_epoch(args.seed, epoch, args.rank)
        for sampler in (getattr(training.loader_train, 'sampler', None),
                        getattr(training.loader_train, 'batch_sampler', None)):
            if hasattr(sampler, 'set_epoch'):
                sampler.set_epoch(epoch)
                break
        train_metrics = train_one_epoch(epoch, training.task, training.loader_train, training.optimizer, args, device,
                                        training.lr_scheduler, training.amp_autocast, training.loss_scaler,
                                        training.mixup_fn)
        _check_some_step_trained(train_metrics, epoch, len(training.loader_train))
        if args.distributed and args.dist_bn in ('broadcast', 'reduce'):  # BatchNorm running stats differ per rank
            utils.distribute_bn(training.task.get_trainable_module(), args.world_size, args.dist_bn == 'reduce')
        eval_metrics = _evaluate(training, args, device) if training.loader_eval is not None else None
        latest_metric = (eval_metrics or train_metrics)[eval_metric]
        if outputs is not None:
            best_metric, best_epoch = _save_epoch(outputs, training.optimizer, epoch, train_metrics, eval_metrics,
                                                  latest_metric)
        if training.lr_scheduler is not None:
            training.lr_scheduler.step(epoch + 1, latest_metric)
    return best_metric, best_epoch


def seed_epoch(seed: int, epoch: int, rank: int = 0) -> None:
    """Seed every generator an epoch draws from (torch's, numpy's, Python's: the sampler's shuffle, the workers' seeds,
    augmentation, mixup, dropout) from the run's ``--seed``, the epoch and the rank.

    An epoch then draws the same numbers whether the run got to it without a stop or was resumed from the checkpoint
    before it, so a resumed run ends with the weights of the run left alone (bit for bit on a CPU). This needs the
    train loader's workers started afresh each epoch (`create_loaders`): persistent workers would carry their
    generators across epochs, and a resumed run's workers would start from other states.
    """
    utils.random_seed((seed + _EPOCH_SEED_STRIDE * (epoch + 1)) % 2 ** 31, rank)


def _check_some_step_trained(train_metrics: Dict[str, float], epoch: int, steps: int) -> None:
    """Refuse an epoch of ``steps`` steps that ``--skip-nonfinite`` skipped all of: it has nothing to save."""
    if train_metrics.get('skipped_steps', 0) >= steps:  # the ranks skip together: all agree
        raise UsageError(
            f"--skip-nonfinite skipped every step of epoch {epoch} (the loss was NaN/inf at all "
            f"{steps}): nothing was trained, so this epoch is neither saved nor exported; the "
            "warnings above name the non-finite term: change the settings that make it (e.g. a lower --lr or "
            "loss weight).")


def _evaluate(training: Training, args: argparse.Namespace, device: torch.device) -> Dict[str, float]:
    """The epoch's validation metrics: with EMA, the EMA weights' (as in timm, those are the ones that are ranked)."""
    task = training.task
    eval_model = task.get_eval_model()
    eval_model.eval()
    eval_metrics = validate(eval_model, training.loader_eval, args, device, training.amp_autocast)
    if task.has_ema():
        ema_eval_model = task.get_eval_model(ema=True)
        ema_eval_model.eval()
        eval_metrics = validate(ema_eval_model, training.loader_eval, args, device, training.amp_autocast,
                                log_name='Test (EMA)')
    return eval_metrics


def _save_epoch(
        outputs: RunOutputs,
        optimizer: torch.optim.Optimizer,
        epoch: int,
        train_metrics: Dict[str, float],
        eval_metrics: Optional[Dict[str, float]],
        latest_metric: float,
) -> Tuple[Optional[float], Optional[int]]:
    """The epoch's row of summary.csv, its checkpoint and, when it is the best so far, its export; (best metric,
    its epoch)."""
    lrs = [group['lr'] for group in optimizer.param_groups]
    summary = os.path.join(outputs.path, 'summary.csv')
    append_summary(summary, epoch, train_metrics, eval_metrics, lr=sum(lrs) / len(lrs))
    best_metric, best_epoch = outputs.saver.save_checkpoint(epoch, metric=latest_metric)
    if best_epoch == epoch or not os.path.exists(os.path.join(outputs.path, LEGACY_WEIGHTS_FILE)):
        outputs.export(epoch, eval_metrics=eval_metrics)
    return best_metric, best_epoch
