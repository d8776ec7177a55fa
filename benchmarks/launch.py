"""Run ``timm-sadistill train`` as a subprocess and read back what it measured (used by the demo and benchmarks/).

The demo and the benchmarks train only through the real command line, so every number they print comes from
the same code a user runs; this module holds the one way of launching it, timing it and reading its
``summary.csv``.
"""
import csv
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

__all__ = ['RECIPE', 'TEACHER_SCHEDULE', 'STUDENT_SCHEDULE', 'RunResult', 'parse_seeds', 'read_summary',
           'train_command', 'run_train', 'schedule_flags', 'write_report']

# The small-data, 64-px CPU recipe of the demo and the benchmarks (timm train.py flags). Light augmentation only:
# digits must not be flipped, and colour jitter means nothing on grey images. AdamW with timm's cosine schedule.
RECIPE = ['--img-size', '64', '--opt', 'adamw', '--weight-decay', '0.05', '-j', '0', '--checkpoint-hist', '1',
          '--scale', '0.5', '1.0', '--hflip', '0', '--color-jitter', '0']
# dataset -> (epochs, batch size, lr, warmup epochs)
# teachers: the full train split of a dataset (data.write_image_folder with train_per_class=None)
TEACHER_SCHEDULE = {'digits': (12, 32, 2e-3, 1), 'lfw': (30, 32, 2e-3, 1)}
# data-starved students (10 images a class): lfw's 20 train images need small batches to take a few steps an
# epoch; no warmup, since with a few steps an epoch timm's epoch-wise warmup spends a whole epoch at warmup_lr
STUDENT_SCHEDULE = {'digits': (12, 16, 3e-3, 0), 'lfw': (30, 8, 3e-3, 0)}


@dataclass
class RunResult:
    """What one training run measured.

    ``top1_final`` is the validation top-1 after the last epoch, the number the benchmarks report (no model
    selection on the validation split); ``top1_best`` is the best epoch's, as timm ranks checkpoints.
    """
    output_dir: str
    command: str
    wall_s: float
    epochs: int
    top1_final: float
    top1_best: float

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)


def schedule_flags(dataset: str, teacher: bool = False, epochs: Optional[int] = None) -> List[str]:
    """The teacher or student schedule of ``dataset`` as flags; ``epochs`` overrides its epochs (smoke runs)."""
    default_epochs, batch_size, lr, warmup = (TEACHER_SCHEDULE if teacher else STUDENT_SCHEDULE)[dataset]
    return ['--epochs', str(epochs or default_epochs), '-b', str(batch_size), '--lr', str(lr),
            '--warmup-epochs', str(min(warmup, (epochs or default_epochs) - 1))]


def parse_seeds(text: str) -> List[int]:
    """Seeds of a benchmark's command line: '0-4' -> [0, 1, 2, 3, 4]; '0,3' -> [0, 3]; '9,8' keeps the order."""
    seeds: List[int] = []
    for part in text.split(','):
        lo, _, hi = part.partition('-')
        seeds.extend(range(int(lo), int(hi or lo) + 1))
    return seeds


def read_summary(output_dir: str) -> List[Dict[str, float]]:
    """The rows of ``<output_dir>/summary.csv`` as floats, one per epoch."""
    with open(os.path.join(output_dir, 'summary.csv'), newline='') as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def train_command(flags: Sequence[str]) -> List[str]:
    """The argv of ``timm-sadistill train <flags>`` with this interpreter (the installed package, or PYTHONPATH's)."""
    return [sys.executable, '-m', 'timm_sadistill', 'train', *flags]


def run_train(
        flags: Sequence[str],
        output: str,
        experiment: str,
        log_path: Optional[str] = None,
        threads: Optional[int] = None,
) -> RunResult:
    """Train with ``timm-sadistill train <flags> --output <output> --experiment <experiment>`` and return its result.

    Args:
        flags: training flags (data, models, method, schedule); output and experiment are added here.
        output, experiment: the run writes ``<output>/<experiment>/`` (summary.csv, model.safetensors, ...).
        log_path: file for the run's stdout/stderr (default ``<output>/<experiment>.log``).
        threads: OMP/torch threads of the run; runs in parallel on a small CPU share it, so each gets a fixed count.

    Raises:
        RuntimeError: the command failed; the message carries the command and the end of its log.
    """
    argv = train_command([*flags, '--output', output, '--experiment', experiment])
    env = dict(os.environ, HF_HUB_OFFLINE='1')
    env.setdefault('TRITON_INTERPRET', '1')  # no GPU: the fused ops must not try to compile
    if threads:
        env['OMP_NUM_THREADS'] = str(threads)
    output_dir = os.path.join(output, experiment)
    # timm appends to an existing summary.csv: a rerun starts from an empty folder so its rows are its own
    shutil.rmtree(output_dir, ignore_errors=True)
    os.makedirs(output, exist_ok=True)
    log_path = log_path or os.path.join(output, f'{experiment}.log')
    start = time.perf_counter()
    with open(log_path, 'w') as log:
        status = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    wall_s = time.perf_counter() - start
    command = shlex.join(['timm-sadistill', 'train', *argv[4:]])
    if status != 0:
        with open(log_path) as log:
            tail = ''.join(log.readlines()[-15:])
        raise RuntimeError(f"'{command}' exited with status {status}; end of {log_path}:\n{tail}")
    rows = read_summary(output_dir)
    return RunResult(
        output_dir=output_dir, command=command, wall_s=wall_s, epochs=len(rows),
        top1_final=rows[-1]['eval_top1'], top1_best=max(row['eval_top1'] for row in rows),
    )


def write_report(path: str, text: str, append: bool = False) -> None:
    """Write (or append) a benchmark's markdown report to ``path``, creating its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'a' if append else 'w') as f:
        f.write(text)
