"""The errors raised for a problem with the user's input, in the Python API and the command line alike."""
import re
from typing import Optional

__all__ = ['UsageError', 'MissingExtraError']

# where a message names its option: ``{option}`` (the name) or ``{option:VALUE}`` (the name given VALUE)
_OPTION_FIELD = re.compile(r'\{option(?::([^{}]*))?\}')


class UsageError(ValueError):
    """A problem with the user's models, stages, options, command or files; the message names the problem and the fix.

    A ``ValueError`` so that Python callers can catch it as one; the command line turns it (and only such deliberate
    errors) into one ``error:`` line and exit status 2, while any other exception keeps its traceback.

    An error about one option carries it: ``option`` is the option's Python name (``'tau'``, ``'img_size'``) and
    ``loss`` the registered name of the loss that declares it (None for a task's or a function's own parameter).
    The message names the option where ``{option}`` stands, and ``{option:64}`` where it is given a value; ``str()``
    writes the Python words (``img_size=64``), and the command line `worded` with its flag (``--img-size 64``).

    Example:
        >>> e = UsageError("{option} must be > 0, got -1.0; e.g. {option:4}.", option='tau', loss='sa')
        >>> str(e)
        'tau must be > 0, got -1.0; e.g. tau=4.'
        >>> e.worded('--sa-tau', ' ')
        '--sa-tau must be > 0, got -1.0; e.g. --sa-tau 4.'
    """

    def __init__(self, message: str, option: Optional[str] = None, loss: Optional[str] = None):
        self.template, self.option, self.loss = message, option, loss
        super().__init__(self.worded())

    def worded(self, name: Optional[str] = None, separator: str = '=') -> str:
        """The message with its option called ``name`` (default: its Python name), and a value given to it written
        ``<name><separator><value>``. A message without an option is returned as it is."""
        if self.option is None:
            return self.template
        name = name or self.option
        return _OPTION_FIELD.sub(lambda m: name if m.group(1) is None else f'{name}{separator}{m.group(1)}',
                                 self.template)

    def __reduce__(self):  # pickled (a DataLoader worker, a spawned process) with its option
        return type(self), (self.template, self.option, self.loss)


class MissingExtraError(UsageError, ImportError):
    """An optional extra is not installed; the message gives the pip command. Also an ``ImportError``, as Python
    callers expect of a missing package."""
