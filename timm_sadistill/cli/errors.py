"""What the command line treats as the user's error: one ``<prog>: error: ...`` line and exit status 2.

`USER_ERRORS` is the one list: the library raises `UsageError` (and `MissingExtraError`, a subclass) where it detects
a mistake, with a message that names the flag or file and the fix; a non-finite loss is a problem of the run's
settings and says which term. Any other exception is a bug and keeps its traceback (exit status 1).
"""
import argparse
import math
from typing import NoReturn

from ..errors import MissingExtraError, UsageError
from ..tasks.nonfinite import NonFiniteLossError

__all__ = ['UsageError', 'MissingExtraError', 'USER_ERRORS', 'OneLineArgumentParser', 'check_finite_floats']

USER_ERRORS = (UsageError, NonFiniteLossError)


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

