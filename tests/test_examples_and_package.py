"""Every example runs as is; the wheel holds the package and the console script."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / 'examples').glob('*.py'))


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE='1', PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''))
    return env


@pytest.mark.slow
@pytest.mark.parametrize('example', EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_example_runs(example):
    args = ['--steps', '12'] if example.name == 'distill_python.py' else []
    proc = subprocess.run([sys.executable, str(example), *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'step' in proc.stdout and 'Traceback' not in proc.stderr


def test_wheel_holds_package_and_entry_point(tmp_path):
    proc = subprocess.run(
        [sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--quiet', '-w', str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheel, = tmp_path.glob('timm_sadistill-*.whl')
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        entry_points = next(zf.read(n).decode() for n in names if n.endswith('entry_points.txt'))
    for module in ('__init__.py', 'features/taps.py', 'features/stage_pairing.py', 'losses/_registry.py', 'losses/sa.py', 'tasks/distill_task.py', 'ops/reference.py'):
        assert f'timm_sadistill/{module}' in names
    assert not any(n.startswith(('tests/', 'examples/', 'benchmarks/', 'demo/')) for n in names)
    # the benchmark and demo recipes are not the library's: only timm_sadistill is installed
    assert all(n.startswith(('timm_sadistill/', 'timm_sadistill-')) for n in names), names
    assert not any(n.endswith(('/datasets.py', '/experiment.py')) for n in names)
    assert 'timm-sadistill = timm_sadistill.cli:main' in entry_points


SCRIPTS = sorted(p for p in [*(ROOT / 'demo').glob('*.py'), *(ROOT / 'benchmarks').glob('*.py')]
                 if "__name__ == '__main__'" in p.read_text())  # the modules beside them are imported, not run


@pytest.mark.slow  # a subprocess that imports torch and timm, each
@pytest.mark.parametrize('script', SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_demo_and_benchmark_scripts_start(script):
    """Each script parses its arguments (a syntax error or a moved import fails here, before any long run)."""
    proc = subprocess.run([sys.executable, str(script), '--help'], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'usage' in proc.stdout.lower()
