"""`make demo`: distil a resnet18 teacher into a small student on real data (scikit-learn's digits), on a CPU.

    python demo/distill_digits.py [--out .demo] [--epochs N]

1. writes digits as 64-px ImageFolders: the full train split, and 5 images a class for the student;
2. trains the teacher (resnet18) on the full split for 4 epochs with ``timm-sadistill train --distill none`` (reused
   when its model folder, ``<out>/teacher/model/``, exists): a third of the benchmarks' 12 epochs, for a demo of a
   few minutes on two cores, at about 98% top-1;
3. trains the student (test_resnet) on the 5 images a class for 60 epochs (the schedule of the SA search in
   benchmarks/sa_search.py, where KD gains about 4 points over no distillation) with ``--distill sa``, ``none``
   and ``kd``, each at its defaults, the teacher given as ``--teacher local-dir:<out>/teacher/model``;
4. prints top-1 on the validation split and the wall time of each run, and where the outputs are. Validation runs
   in batches of 256 (it is most of a student epoch's cost at the training batch of 16).

Every step is the real command line, with the recipe of `benchmarks.launch`. One seed only: docs/results.md
(from benchmarks/results/sa-search/) has the paired means over 20 seeds.
"""
import argparse
import os
import sys
import time
from typing import Dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the checkout's benchmarks/ recipes (and the package, without an install)

from benchmarks.data import CLASS_NAMES, write_image_folder  # noqa: E402
from benchmarks.launch import (  # noqa: E402
    RECIPE, RunResult, run_train, schedule_flags)

TEACHER, STUDENT, PER_CLASS, EPOCHS, TEACHER_EPOCHS = 'resnet18', 'test_resnet', 5, 60, 4
VALIDATION = ['--validation-batch-size', '256']


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default=os.path.join(ROOT, '.demo'), help='output folder (default: .demo)')
    parser.add_argument('--epochs', type=int, default=EPOCHS, help=f'student epochs (default: {EPOCHS})')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    threads = os.cpu_count() or 1  # one run at a time: it may use every core
    num_classes = ['--num-classes', str(len(CLASS_NAMES['digits']))]

    full = write_image_folder('digits', os.path.join(args.out, 'data', 'digits-full'))
    write_image_folder('digits', os.path.join(args.out, 'data', f'digits-n{PER_CLASS}'), train_per_class=PER_CLASS)
    print(f"digits: {full['train']} train / {full['validation']} validation images; the student gets {PER_CLASS} "
          'a class', flush=True)

    teacher_dir = os.path.join(args.out, 'teacher')
    teacher_folder = os.path.join(teacher_dir, 'model')  # a timm model folder: config.json, weights, model card
    results: Dict[str, RunResult] = {}
    if os.path.isfile(os.path.join(teacher_folder, 'config.json')):
        print(f'teacher: reusing {teacher_folder}', flush=True)
    else:
        print(f'teacher: training {TEACHER} on the full split ...', flush=True)
        results['teacher (none)'] = run_train(
            [*RECIPE, *VALIDATION, *schedule_flags('digits', teacher=True, epochs=TEACHER_EPOCHS), *num_classes,
             '--model', TEACHER,
             '--data-dir', os.path.join(args.out, 'data', 'digits-full'), '--distill', 'none', '--seed', '0'],
            args.out, 'teacher', threads=threads)

    for method in ('sa', 'none', 'kd'):
        print(f'student: {STUDENT} with --distill {method} ...', flush=True)
        flags = [*RECIPE, *VALIDATION, *schedule_flags('digits', epochs=args.epochs), *num_classes, '--model', STUDENT,
                 '--data-dir', os.path.join(args.out, 'data', f'digits-n{PER_CLASS}'), '--distill', method,
                 '--seed', str(args.seed)]
        if method != 'none':
            flags += ['--teacher', f'local-dir:{teacher_folder}']
        results[f'student ({method})'] = run_train(flags, args.out, f'student-{method}', threads=threads)

    print('\n| run | top-1 (%) | wall (s) | output |\n|---|---|---|---|')
    for name, result in results.items():
        print(f'| {name} | {result.top1_final:.1f} | {result.wall_s:.0f} | {os.path.relpath(result.output_dir)} |')
    print(f'\ntotal {time.perf_counter() - start:.0f} s; outputs (summary.csv, model/ folders, logs) in '
          f"{os.path.relpath(args.out)}/. One seed: docs/results.md has paired means over seeds.")
    return 0


if __name__ == '__main__':
    sys.exit(main())
