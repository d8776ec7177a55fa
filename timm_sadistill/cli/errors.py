"""The one exception type the command line turns into a short message and exit status 2."""

__all__ = ['UsageError']


class UsageError(Exception):
    """A problem with the user's command or files: its message names the problem and the fix."""
