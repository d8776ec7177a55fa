"""The errors the command line turns into a short message and exit status 2."""
from ..errors import UsageError
from ..tasks.nonfinite import NonFiniteLossError

__all__ = ['UsageError', 'USER_ERRORS']


# "The user asked for something that cannot work": the library raises these with messages that name the problem and
# the fix (ImportError: a missing optional extra, with the pip command). Anything else is a bug and keeps its traceback.
USER_ERRORS = (UsageError, NonFiniteLossError, ValueError, FileNotFoundError, TypeError, ImportError)
