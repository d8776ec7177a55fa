"""The errors raised for a problem with the user's input, in the Python API and the command line alike."""

__all__ = ['UsageError', 'MissingExtraError']


class UsageError(ValueError):
    """A problem with the user's models, stages, options, command or files; the message names the problem and the fix.

    A ``ValueError`` so that Python callers can catch it as one; the command line turns it (and only such deliberate
    errors) into one ``error:`` line and exit status 2, while any other exception keeps its traceback.
    """


class MissingExtraError(UsageError, ImportError):
    """An optional extra is not installed; the message gives the pip command. Also an ``ImportError``, as Python
    callers expect of a missing package."""
