"""SA trained with the Triton and with the torch backend from the same seed: do the loss curves agree?

    python benchmarks/backend_agreement.py --amp --channels-last --out agreement.md      # GPU (gpu_check.sh)
    TRITON_INTERPRET=1 python benchmarks/backend_agreement.py --teacher test_resnet --student test_resnet \\
        --img-size 32 --num-classes 10 --batch-size 4 --steps 5                         # CPU smoke run

Three runs of ``--steps`` AdamW steps, each built by overhead.py's `build` (same seed: the same student,
connectors and teacher) and fed the same batches (batch k drawn from seed k): ``sa[backend=triton]``,
``sa[backend=torch]``, and ``sa[backend=torch]`` started from every trainable weight moved by one float32 ulp
(a random direction each). That third run is the yardstick: how far two trajectories that start a rounding
error apart drift in ``--steps`` steps on this stack (cuDNN's non-deterministic algorithms add to it on a GPU).

Checks, on every term the task returns (loss, task_loss, kd_loss, sa_dist, sa_att, sa_cam, sa_kd: each has its own
curve, so a kernel that gets one term wrong shows even where the cross-entropy dominates the total):
  * the first step's gradient of every trainable parameter (same weights, same batch), triton vs torch:
    relative L2 distance ≤ ``--grad-rtol``: 1e-4 in fp32 (both compute the same float32 math, only the
    summation order differs: 7e-7 measured on the CPU), 5e-2 under bf16 autocast (ds is rounded to bfloat16 by
    both, and an element near a rounding boundary can round the other way, up to 2^-7 = 0.8 % apart; these pass
    through every bf16 layer of the student's backward and pick up new ones there: 0.7 % measured on the CPU's
    shallow toy student). A backward that drops L_att's gradient is 89 % off;
  * every term at step 1 (before any update) within ``--rtol-first`` = 1e-4 relative: float32 sums of the
    same values in another order;
  * every term's curve within max(``--drift-factor`` (10) x the yardstick's drift, ``--rtol-floor`` (1e-3)),
    drift being max over steps of |a - b| / max(|b|, 1e-3). Rounding differences grow through training (Adam
    amplifies tiny gradient differences in near-zero coordinates), so the curves are not bitwise equal: on the
    CPU (resnet18 -> test_resnet, 64 px, batch 8, 50 steps, fp32 and bf16 autocast) the backends drifted 0.6 to
    1.5x the yardstick per term, and the backward without L_att's gradient 80 to 6000x it (in 10 steps).
"""
import argparse
import os
import shlex
import sys
from typing import Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import overhead  # noqa: E402  (build, step, autocast: the same step the overhead table times)

from benchmarks.launch import write_report  # noqa: E402

# (label, backend, weights moved by one ulp): the third run is the yardstick of rounding-sized differences
RUNS = (('triton', 'triton', False), ('torch', 'torch', False), ('torch, weights ±1 ulp', 'torch', True))


def train_curve(args: argparse.Namespace, backend: str, nudge: bool,
                device: torch.device) -> Tuple[Dict[str, List[float]], torch.Tensor]:
    """(each term's value at each of ``args.steps`` steps of SA with ``backend``, the first step's gradient of
    every trainable parameter, flattened). ``nudge`` moves every trainable weight by one float32 ulp (a random
    direction each) before training: a perturbation the size of a rounding difference."""
    task, optimizer = overhead.build(f'sa[backend={backend}]', args.teacher, args.student, args.num_classes,
                                     args.img_size, device, channels_last=args.channels_last)
    params = [p for p in task.get_trainable_module().parameters() if p.requires_grad]
    if nudge:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in params:
                sign = torch.randint(0, 2, p.shape, generator=g).to(p.device) * 2 - 1
                p.mul_(1 + sign * 2.0 ** -23)
    autocast = overhead.autocast_of(args, device)
    curves: Dict[str, List[torch.Tensor]] = {}
    first_grad = None
    for k in range(args.steps):
        g = torch.Generator().manual_seed(k)
        x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g).to(device)
        y = torch.randint(0, args.num_classes, (args.batch_size,), generator=g).to(device)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for name, value in overhead.step(task, optimizer, x, y, autocast).items():
            curves.setdefault(name, []).append(value.float())
        if k == 0:  # the step leaves its gradients in .grad until the next step's zero_grad
            first_grad = torch.cat([p.grad.float().flatten() for p in params if p.grad is not None])
    return {name: torch.stack(values).tolist() for name, values in curves.items()}, first_grad  # one sync


def max_rel_diff(a: List[float], b: List[float], floor: float = 1e-3) -> float:
    """max over steps of |a - b| / max(|b|, floor): relative, except for terms near 0."""
    return max(abs(x - y) / max(abs(y), floor) for x, y in zip(a, b))


def report(args: argparse.Namespace, runs: Dict[str, Tuple[Dict[str, List[float]], torch.Tensor]],
           command: str) -> Tuple[str, bool]:
    """(markdown: the verdicts, each term's differences, the curves every few steps; whether every check passed)."""
    (triton, triton_grad), (torch_, torch_grad), (nudged, _) = (runs[label] for label, _, _ in RUNS)
    grad_diff = ((triton_grad - torch_grad).norm() / torch_grad.norm()).item()
    ok = grad_diff <= args.grad_rtol
    rows = []
    for name in torch_:
        first = abs(triton[name][0] - torch_[name][0]) / max(abs(torch_[name][0]), 1e-3)
        curve = max_rel_diff(triton[name], torch_[name])
        yardstick = max_rel_diff(nudged[name], torch_[name])
        passed = first <= args.rtol_first and curve <= max(args.drift_factor * yardstick, args.rtol_floor)
        ok &= passed
        rows.append(f'| {name} | {first:.1e} | {curve:.1e} | {yardstick:.1e} | {"ok" if passed else "**FAILED**"} |')
    where = torch.cuda.get_device_name() if args.device.startswith('cuda') else 'CPU (Triton interpreter)'
    setting = ', '.join(filter(None, ['bf16 autocast' if args.amp else 'fp32',
                                      'channels-last' if args.channels_last else '']))
    names = list(torch_)
    lines = [f'# SA, Triton vs torch backend: {args.steps} training steps from the same seed', '',
             f'`{args.teacher}` -> `{args.student}`, batch {args.batch_size}, {args.img_size} px, '
             f'{args.num_classes} classes, {setting}, AdamW lr 1e-3; {where}, torch {torch.__version__}.', '',
             f'Reproduce: `{command}`', '',
             f'**{"PASS" if ok else "FAIL"}**. Checks (why these tolerances: the script\'s docstring): the first '
             f'step\'s gradient of every trainable parameter, relative L2 distance {grad_diff:.1e} '
             f'(≤ {args.grad_rtol:g}: {"ok" if grad_diff <= args.grad_rtol else "**FAILED**"}); every term at step 1 '
             f'within {args.rtol_first:g}; every term\'s curve within max({args.drift_factor:g} × the yardstick, '
             f'{args.rtol_floor:g}), the yardstick being the torch run started from weights moved by one ulp.', '',
             '| term | step 1, triton vs torch | curve, triton vs torch | yardstick: curve, torch ±1 ulp vs torch | |',
             '|---|---:|---:|---:|---|', *rows, '',
             'Curves: relative differences are max over steps of |a - b| / max(|b|, 1e-3).', '',
             '| step | ' + ' | '.join(f'{n} triton | {n} torch' for n in names) + ' |',
             '|---:|' + '---:|' * (2 * len(names))]
    every = max(1, args.steps // 10)
    for k in sorted(set(range(0, args.steps, every)) | {args.steps - 1}):
        lines.append(f'| {k + 1} | ' + ' | '.join(f'{triton[n][k]:.5g} | {torch_[n][k]:.5g}' for n in names) + ' |')
    return '\n'.join(lines) + '\n', ok


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--teacher', default='resnet50')
    parser.add_argument('--student', default='resnet18')
    parser.add_argument('--num-classes', type=int, default=1000)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--steps', type=int, default=50)
    parser.add_argument('--amp', action='store_true', help='bfloat16 autocast')
    parser.add_argument('--channels-last', action='store_true', help='channels-last student and input (as the CLI)')
    parser.add_argument('--rtol-first', type=float, default=1e-4, help='tolerance of every term at step 1')
    parser.add_argument('--grad-rtol', type=float, default=None,
                        help='tolerance of the first step\'s gradient (default 1e-4 fp32, 5e-2 with --amp)')
    parser.add_argument('--drift-factor', type=float, default=10.0,
                        help='curve tolerance in units of the ±1 ulp yardstick run\'s drift')
    parser.add_argument('--rtol-floor', type=float, default=1e-3, help='curve tolerance never below this')
    parser.add_argument('--threads', type=int, default=1, help='torch threads (CPU)')
    parser.add_argument('--out', help='also write the markdown report to this file')
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.grad_rtol is None:
        args.grad_rtol = 5e-2 if args.amp else 1e-4
    runs = {label: train_curve(args, backend, nudge, device) for label, backend, nudge in RUNS}
    text, ok = report(args, runs, shlex.join(['python', 'benchmarks/backend_agreement.py', *argv]))
    if args.out:
        write_report(args.out, text)
    print(text)
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
