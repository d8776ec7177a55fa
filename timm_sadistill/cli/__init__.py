"""`timm-sadistill` command line: ``timm-sadistill <subcommand> ...`` and ``python -m timm_sadistill ...``.

Each subcommand is a module with ``main(argv) -> int``; it is imported only when it runs, so ``train`` pays nothing
for ``viz``'s plotting imports and the reverse.
"""
import importlib
import sys
from typing import List, Optional

from ._common import run_command
from ..errors import UsageError

__all__ = ['main', 'UsageError', 'SUBCOMMANDS']

# subcommand -> module that implements it (one line per subcommand)
SUBCOMMANDS = {
    'train': 'timm_sadistill.cli.train',
    'timm-train': 'timm_sadistill.cli.timm_train',
    'stages': 'timm_sadistill.cli.stages',
    'viz': 'timm_sadistill.cli.viz',
}


def _usage() -> str:
    return 'usage: timm-sadistill {' + ','.join(SUBCOMMANDS) + '} ...\n'


def main(argv: Optional[List[str]] = None) -> int:
    """Run a subcommand; returns the exit status (2 for usage errors, printed to stderr without a traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ('-h', '--help'):
        (sys.stdout if argv else sys.stderr).write(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        sys.stderr.write(f"timm-sadistill: error: unknown subcommand '{command}'; "
                         f"choose one of {', '.join(SUBCOMMANDS)}.\n")
        return 2
    return run_command(f'timm-sadistill {command}', lambda: importlib.import_module(SUBCOMMANDS[command]).main(rest) or 0)
