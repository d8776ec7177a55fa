"""benchmarks/gpu_check.sh stays runnable within its lease: valid bash, within the time budget and the device
tool's file limit. (Its steps are proved on the CPU by ``benchmarks/gpu_check.sh --dry-run``, minutes long.)"""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / 'benchmarks' / 'gpu_check.sh'
BUDGET_S = 510  # a lent GPU machine gives 15 minutes in all: they must hold its start, this script and one rerun
MAX_FILES = 8  # the device tool brings back at most 8 files from $OUT
KILL_GRACE_S = 2  # timeout -k 2


def _gpu_branch() -> str:
    text = SCRIPT.read_text()
    return text[text.index('\nelse\n    step '):]


def test_script_is_valid_bash():
    subprocess.run(['bash', '-n', str(SCRIPT)], check=True)


@pytest.mark.skipif(shutil.which('shellcheck') is None, reason='shellcheck is not installed')
def test_script_passes_shellcheck():
    result = subprocess.run(['shellcheck', str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_gpu_steps_fit_the_time_budget():
    limits = [int(n) for n in re.findall(r'^\s*step "[^"]+" (\d+) ', _gpu_branch(), re.M)]
    setup = [int(n) for n in re.findall(r'timeout -k \d+ (\d+) "\$PYTHON" -m pip', SCRIPT.read_text())]
    assert len(limits) == 9 and len(setup) == 1
    assert sum(limits) + sum(setup) + KILL_GRACE_S * (len(limits) + len(setup)) <= BUDGET_S


def test_script_writes_at_most_eight_files():
    text = SCRIPT.read_text()
    files = set(re.findall(r'\$OUT/([A-Za-z_]+-\$gpu\.[a-z]+)', text))
    assert {'gpu_check-$gpu.log', 'gpu_check-$gpu.md'} <= files and len(files) <= MAX_FILES, files
