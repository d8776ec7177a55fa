"""The argument parser of every subcommand: a mistake is one line, and no float flag takes NaN or inf."""
import argparse
import math
from typing import NoReturn

from ..errors import UsageError

__all__ = ['OneLineArgumentParser', 'check_finite_floats']


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a mistake is one line: the usage block of a command with a hundred flags buries the message."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def check_finite_floats(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse NaN and inf in any float flag (argparse's ``float`` takes 'nan'), naming the flag.

    Also covers values set by a ``-c`` YAML file, which argparse does not convert.
    """
    for action in parser._actions:
        if action.type is not float or not action.option_strings:
            continue
        value = getattr(args, action.dest, None)
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise UsageError(f"{action.option_strings[-1]} must be a finite number, got {value}.")

