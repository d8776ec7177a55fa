"""SIGTERM as a stop the run can clean up after, like Ctrl-C.

SLURM, Kubernetes and torchrun send SIGTERM before they kill a process (torchrun to every rank). Python's default
lets it end the process at once, with no message and whatever a save was writing left half-written; within
`sigterm_interrupts` it raises `Terminated` (a ``KeyboardInterrupt``) where the main thread is, so the code that
handles Ctrl-C (remove partial writes, keep the run folder resumable, print how to go on) handles it too.
"""
import contextlib
import signal
import threading
from typing import Iterator, List

__all__ = ['Terminated', 'TERMINATED_STATUS', 'sigterm_interrupts']

TERMINATED_STATUS = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM: 143


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: raised in the main thread where it was, as Ctrl-C raises ``KeyboardInterrupt``."""


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[List[int]]:
    """Within the block, SIGTERM raises `Terminated` in the main thread; yields a list that holds the signal number
    once it arrived (the clean-up may raise a ``KeyboardInterrupt`` of its own, which then still counts as SIGTERM).

    A second SIGTERM during the clean-up is ignored: the sender's kill follows it anyway. A SIGTERM the process was
    started with ignored stays ignored, and off the main thread (where no handler can be set) nothing changes.
    """
    received: List[int] = []
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        yield received
        return

    def terminate(signum: int, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        received.append(signum)
        raise Terminated('SIGTERM')

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)
