"""Worker processes forked from this one, for jobs shared out file by file.

Each worker inherits an owner object as it was at the fork (a tagger with its
networks loaded, an indexer), so nothing is pickled or loaded again and it
starts at once; it runs the owner's methods on shares of a job, on one thread.
Threads of one process share its Python interpreter and slow each other down;
processes run side by side. A worker stops when the process that forked it
ends, even by `kill -9`.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool

import torch

from .errors import SoundtagError

PR_SET_PDEATHSIG = 1  # prctl option: the signal a process gets when its parent ends

_owner: object | None = None  # in a worker process: the object it inherited


class WorkerDied(SoundtagError):
    """A worker process ended in the middle of a job (killed, or out of memory)."""


class Workers:
    """`processes` worker processes holding `owner`; `start` runs in each as it begins."""

    def __init__(self, owner: object, processes: int, start: Callable[[], None] | None = None):
        self.processes = processes
        self._pool = ProcessPoolExecutor(processes, multiprocessing.get_context("fork"), _adopt,
                                         (owner, start, os.getpid()))

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)

    def run(self, method: str, shares: Sequence[object]) -> Iterator[tuple[int, object]]:
        """(position, owner.method(share)) for each share, as the workers finish
        them; a share not started yet is dropped when the caller stops or fails."""
        futures: dict[Future, int] = {}
        try:
            for i, share in enumerate(shares):
                futures[self._pool.submit(_call, method, share)] = i
            for done in as_completed(futures):
                yield futures[done], done.result()
        except BrokenProcessPool:
            raise WorkerDied("a worker process died (killed, or out of memory)") from None
        finally:
            for future in futures:
                future.cancel()


def _adopt(owner: object, start: Callable[[], None] | None, parent: int) -> None:
    """A worker's start: it ends with its parent, leaves Ctrl-C to it, and runs torch on one thread."""
    global _owner
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent ended before the line above took effect
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    if start is not None:
        start()
    _owner = owner


def _call(method: str, share: object) -> object:
    return getattr(_owner, method)(share)
