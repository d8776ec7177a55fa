"""One epoch of timm's training loop over a task, and the validation pass (top-1, top-5 and loss, over ranks)."""
import argparse
import logging
import sys
import time
from collections import OrderedDict
from contextlib import suppress
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from timm import utils
from timm.data import Mixup
from timm.task import TrainingTask
from timm.utils import NativeScaler

from ..tasks import guard_finite_loss
from .progress import ProgressBar

__all__ = ['train_one_epoch', 'validate']

_logger = logging.getLogger('timm_sadistill.train')


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
