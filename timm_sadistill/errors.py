"""The errors raised for a problem with the user's input, in the Python API and the command line alike."""
import re
from typing import Callable, Optional, Tuple, Union

__all__ = ['UsageError', 'MissingExtraError']

# where a message names an option: ``{option}`` (the option) or ``{option:VALUE}`` (the option given VALUE), and
# ``{option.NAME}`` / ``{option.NAME:VALUE}`` for another option NAME of the same caller that the message names too
_OPTION_FIELD = re.compile(r'\{option(?:\.(\w+))?(?::([^{}]*))?\}')


class UsageError(ValueError):
    """A problem with the user's models, stages, options, command or files; the message names the problem and the fix.

    A ``ValueError`` so that Python callers can catch it as one; the command line turns it (and only such deliberate
    errors) into one ``error:`` line and exit status 2, while any other exception keeps its traceback.

    An error about an option carries it: ``option`` is the option's Python name (``'tau'``, ``'img_size'``) and
    ``loss`` the registered name of the loss that declares it (None for a task's or a function's own parameter).
    The message names the option where ``{option}`` stands, and ``{option:64}`` where it is given a value; another
    option of the same caller it names is ``{option.NAME}`` (``{option.teacher_stages}``), listed in ``options``.
    ``str()`` writes the Python words (``img_size=64``), and the command line `worded` with each flag
    (``--img-size 64``).

    Example:
        >>> e = UsageError("{option} must be > 0, got -1.0; e.g. {option:4}.", option='tau', loss='sa')
        >>> str(e)
        'tau must be > 0, got -1.0; e.g. tau=4.'
        >>> e.worded('--sa-tau', ' ')
        '--sa-tau must be > 0, got -1.0; e.g. --sa-tau 4.'
        >>> UsageError("pass {option.student_stages} and {option.teacher_stages}.", option='student_stages').options
        ('student_stages', 'teacher_stages')
    """

    def __init__(self, message: str, option: Optional[str] = None, loss: Optional[str] = None):
        self.template, self.option, self.loss = message, option, loss
        super().__init__(self.worded())

    @property
    def options(self) -> Tuple[str, ...]:
        """Every option the message names: ``option`` first, then each ``{option.NAME}`` in order."""
        if self.option is None:
            return ()
        named = [m.group(1) for m in _OPTION_FIELD.finditer(self.template) if m.group(1)]
        return tuple(dict.fromkeys([self.option, *named]))

    def worded(self, name: Union[None, str, Callable[[str], str]] = None, separator: str = '=') -> str:
        """The message with its option called ``name`` (default: its Python name; a function of the Python name
        words every option it names), and a value given to it written ``<name><separator><value>``. A message
        without an option is returned as it is."""
        if self.option is None:
            return self.template

        def word(match: re.Match) -> str:
            option = match.group(1) or self.option
            called = name(option) if callable(name) else (name if name and not match.group(1) else option)
            return called if match.group(2) is None else f'{called}{separator}{match.group(2)}'

        return _OPTION_FIELD.sub(word, self.template)

    def __reduce__(self):  # pickled (a DataLoader worker, a spawned process) with its option
        return type(self), (self.template, self.option, self.loss)


class MissingExtraError(UsageError, ImportError):
    """An optional extra is not installed; the message gives the pip command. Also an ``ImportError``, as Python
    callers expect of a missing package."""
