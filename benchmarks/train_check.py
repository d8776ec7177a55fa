"""One epoch of ``timm-sadistill train --distill sa`` with given flags: are the losses finite, do the checkpoints load?

    python benchmarks/train_check.py --flags '--amp --channels-last' --out train.md                  # GPU, fp16
    python benchmarks/train_check.py --flags '--amp --amp-dtype bfloat16 --channels-last --torchcompile' \\
        --out train.md                                                                  # GPU, appends a section
    python benchmarks/train_check.py --teacher test_resnet --student test_resnet --img-size 32 --per-class 4 \\
        --batch-size 8 --out /tmp/train.md                                               # CPU smoke run

It writes scikit-learn's digits as an ImageFolder (``benchmarks.data``, ``--per-class`` train images a
class, the fixed validation split) and a random-weight teacher checkpoint (the teacher's accuracy does not
matter here), trains one epoch through the real command line (``benchmarks.launch.run_train``, the way
the demo and the benchmarks launch it), and checks:
  * every value in summary.csv is finite: the train loss and each of its terms, the eval loss, top-1, top-5;
  * model.safetensors loads into a fresh ``timm.create_model(student)`` (strict: a compile wrapper's
    ``_orig_mod.`` key prefix would fail) and gives finite logits;
  * last.pth.tar resumes into a freshly built SA task with timm's ``resume_task_checkpoint`` (what ``--resume``
    calls), connectors included, at epoch 1.
The section it writes (appended when ``--out`` exists) gives the command, the wall time and each check.
"""
import argparse
import math
import os
import re
import shlex
import sys
import time
from typing import List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import overhead  # noqa: E402  (its build is the task the checkpoint resumes into; it puts the checkout on the path)

import timm  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from timm.task import resume_task_checkpoint  # noqa: E402

from benchmarks.data import CLASS_NAMES, write_image_folder  # noqa: E402
from benchmarks.launch import RECIPE, read_summary, run_train, write_report  # noqa: E402

DATASET = 'digits'


def train_flags(args: argparse.Namespace, data: str, teacher_checkpoint: str) -> List[str]:
    """The command's flags: the benchmarks' recipe at ``--img-size``, one epoch, then ``--flags``."""
    recipe = list(RECIPE)
    recipe[recipe.index('--img-size') + 1] = str(args.img_size)
    return [*recipe, '--data-dir', data, '--model', args.student, '--num-classes', str(len(CLASS_NAMES[DATASET])),
            '--distill', 'sa', '--teacher', args.teacher, '--teacher-checkpoint', teacher_checkpoint,
            '--epochs', '1', '-b', str(args.batch_size), '--lr', '1e-3', '--warmup-epochs', '0', '--seed', '0',
            *shlex.split(args.flags)]


def check(output_dir: str, args: argparse.Namespace) -> List[Tuple[str, bool, str]]:
    """(check, passed, detail) of the run in ``output_dir``."""
    num_classes = len(CLASS_NAMES[DATASET])
    results = []
    rows = read_summary(output_dir)
    bad = [f'{k}={v}' for row in rows for k, v in row.items() if not math.isfinite(v)]
    terms = ', '.join(f'{k} {v:.4g}' for k, v in rows[-1].items() if k != 'epoch')
    missing = [k for k in ('train_loss', 'train_sa_dist', 'train_sa_att', 'eval_loss', 'eval_top1') if k not in rows[-1]]
    detail = ', '.join(bad + [f'no {k}' for k in missing]) or terms
    results.append(('summary.csv has every term, all finite', not bad and not missing and len(rows) == 1, detail))
    try:
        path = os.path.join(output_dir, 'model.safetensors')
        model = timm.create_model(args.student, pretrained=True, num_classes=num_classes,
                                  pretrained_cfg_overlay=dict(file=path, num_classes=num_classes)).eval()
        with torch.no_grad():
            logits = model(torch.randn(2, 3, args.img_size, args.img_size))
        results.append(('model.safetensors loads into timm.create_model', bool(torch.isfinite(logits).all()),
                        f'logits {tuple(logits.shape)}'))
    except Exception as e:  # noqa: BLE001 - a failed check is reported with the others
        results.append(('model.safetensors loads into timm.create_model', False, f'{type(e).__name__}: {e}'))
    try:
        task, _ = overhead.build('sa', args.teacher, args.student, num_classes, args.img_size, torch.device('cpu'))
        epoch = resume_task_checkpoint(task, os.path.join(output_dir, 'last.pth.tar'), weights_only=False,
                                       log_info=False)
        results.append(('last.pth.tar resumes into an SA task', epoch == 1, f'resume epoch {epoch}'))
    except Exception as e:  # noqa: BLE001
        results.append(('last.pth.tar resumes into an SA task', False, f'{type(e).__name__}: {e}'))
    return results


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--teacher', default='resnet50')
    parser.add_argument('--student', default='resnet18')
    parser.add_argument('--img-size', type=int, default=64)
    parser.add_argument('--per-class', type=int, default=32, help='train images a class (10 classes)')
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--flags', default='', help="extra train flags, e.g. '--amp --channels-last --torchcompile'")
    parser.add_argument('--work', default='/tmp/tsd-train-check', help='data, teacher and run folders')
    parser.add_argument('--experiment', default=None, help='run folder name (default: from --flags)')
    parser.add_argument('--out', help='append the markdown section to this file')
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)

    data = os.path.join(args.work, f'{DATASET}-n{args.per_class}-{args.img_size}px')
    write_image_folder(DATASET, data, size=args.img_size, train_per_class=args.per_class)
    teacher_checkpoint = os.path.join(args.work, f'{args.teacher}-random.safetensors')
    if not os.path.isfile(teacher_checkpoint):
        torch.manual_seed(0)
        teacher = timm.create_model(args.teacher, num_classes=len(CLASS_NAMES[DATASET]))
        save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, teacher_checkpoint)
    experiment = args.experiment or 'sa-' + (re.sub(r'[^A-Za-z0-9]+', '-', args.flags).strip('-') or 'plain')
    start = time.perf_counter()
    try:
        run = run_train(train_flags(args, data, teacher_checkpoint), os.path.join(args.work, 'runs'), experiment)
        results = check(run.output_dir, args)
        command = run.command
    except RuntimeError as e:  # the command failed: run_train's message holds the end of its log
        results, command = [('timm-sadistill train exits 0', False, str(e).replace('\n', ' / '))], '(failed)'
    wall = time.perf_counter() - start
    ok = all(passed for _, passed, _ in results)
    lines = [f'## `{args.flags or "(no extra flags)"}`: **{"PASS" if ok else "FAIL"}**', '',
             f'`{args.teacher}` -> `{args.student}`, {DATASET} at {args.img_size} px, {args.per_class} train images '
             f'a class, batch {args.batch_size}, one epoch; {wall:.0f} s including the checks, torch '
             f'{torch.__version__}, {torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"}.', '',
             f'Command: `{command}`', '', '| check | | detail |', '|---|---|---|']
    lines += [f'| {name} | {"ok" if passed else "**FAILED**"} | {detail} |' for name, passed, detail in results]
    text = '\n'.join(lines) + '\n\n'
    if args.out:
        write_report(args.out, text, append=True)
    print(text)
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
