"""A one-line progress bar with rate and ETA, for terminals only (logs stay plain lines elsewhere)."""
import sys
import time
from typing import Optional, TextIO

__all__ = ['ProgressBar']


def _format_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f'{hours:d}:{minutes:02d}:{secs:02d}' if hours else f'{minutes:02d}:{secs:02d}'


class ProgressBar:
    """``bar = ProgressBar(total, 'Train 3')``; ``bar.update(postfix='loss 0.41')`` per step; ``bar.close()``.

    Redraws one line of ``stream`` in place; it is only meant for a terminal (check ``stream.isatty()``).
    """

    def __init__(self, total: int, description: str, stream: Optional[TextIO] = None, width: int = 24):
        self.total = max(total, 1)
        self.description = description
        self.stream = stream or sys.stderr
        self.width = width
        self.count = 0
        self.start = time.monotonic()

    def update(self, steps: int = 1, postfix: str = '') -> None:
        self.count = min(self.count + steps, self.total)
        elapsed = time.monotonic() - self.start
        rate = self.count / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.count) / rate if rate > 0 else 0.0
        filled = self.width * self.count // self.total
        bar = '#' * filled + '-' * (self.width - filled)
        self.stream.write(
            f'\r{self.description} [{bar}] {self.count}/{self.total} '
            f'{rate:.2f} it/s ETA {_format_seconds(eta)} {postfix}\033[K'
        )
        self.stream.flush()

    def close(self) -> None:
        self.stream.write('\n')
        self.stream.flush()
