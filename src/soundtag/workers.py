"""Worker processes forked from this one, for jobs shared out file by file.

Each worker inherits an owner object as it was at the fork (a tagger with its
networks loaded, an indexer), so nothing is pickled or loaded again and it
starts at once; it runs the owner's methods on shares of a job, on one thread.
Threads of one process share its Python interpreter and slow each other down;
processes run side by side. A worker ends with the process that forked it,
even after `kill -9`; Ctrl-C is the parent's, which then kills its workers.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

import torch
from tqdm import tqdm
from tqdm.std import TqdmDefaultWriteLock

from .errors import SoundtagError
from .store import one_torch_thread

PR_SET_PDEATHSIG = 1  # prctl option: the signal a process gets when its parent ends
PROCESS_FILES = 32  # files a job needs for each worker process it is shared among; the smallest share
SHARES = 8  # shares of a job for each worker process: small enough to even out, large enough to batch well
POLL = 0.5  # seconds between checks that a job's workers were not stopped under it

_forking: tuple[object, Callable[[], None] | None] | None = None  # the owner while workers are forked
_fork_lock = threading.Lock()
_owner: object | None = None  # in a worker process: the object it inherited
T = TypeVar("T")


def processes_for(files: int, most: int) -> int:
    """How many of `most` worker processes a job of `files` files is worth (1 or fewer: none)."""
    return min(most, files // PROCESS_FILES)


def shares(items: Sequence[T], processes: int, largest: int) -> list[tuple[int, Sequence[T]]]:
    """A job cut into (start, items) shares for `processes` workers: up to
    SHARES each, of PROCESS_FILES to `largest` items."""
    size = min(largest, max(PROCESS_FILES, -(-len(items) // (SHARES * processes))))
    return [(start, items[start:start + size]) for start in range(0, len(items), size)]


class WorkerDied(SoundtagError):
    """A worker process ended in the middle of a job (killed, or out of memory)."""


class Workers:
    """`processes` worker processes holding `owner`; `start` runs in each as it
    begins. Nothing here refers to `owner` or `start` once the workers are
    forked, so dropping the owner drops the workers."""

    def __init__(self, owner: object, processes: int, start: Callable[[], None] | None = None):
        global _forking
        self.processes = processes
        with _fork_lock:
            _forking = owner, start
            try:
                self._pool = ProcessPoolExecutor(processes, multiprocessing.get_context("fork"), _adopt,
                                                 (os.getpid(),))
                self._pool.submit(int).result()  # the first job forks every worker, now, while _forking is set
            finally:
                _forking = None

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Let the shares started finish, drop the others, and stop the workers."""
        self._pool.shutdown(cancel_futures=True)

    def kill(self) -> None:
        """Stop the workers at once, whatever they are doing (they only read)."""
        for process in list((self._pool._processes or {}).values()):  # no other way in; None once shut down
            process.kill()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def run(self, method: str, parts: Sequence[object]) -> Iterator[tuple[int, object]]:
        """(position, owner.method(part)) for each of the job's parts, as the workers finish
        them; a share not started yet is dropped when the caller stops or fails,
        and Ctrl-C kills the workers."""
        futures: dict[Future, int] = {}
        try:
            for i, part in enumerate(parts):
                futures[self._pool.submit(_call, method, part)] = i
            pending = set(futures)
            while pending:
                done, pending = wait(pending, POLL, FIRST_COMPLETED)
                if any(f.cancelled() for f in pending):
                    raise SoundtagError("the worker processes were stopped during the job")
                for future in done:
                    yield futures[future], future.result()
        except BrokenProcessPool:
            raise WorkerDied("a worker process died (killed, or out of memory)") from None
        except KeyboardInterrupt:
            self.kill()
            raise
        finally:
            for future in futures:
                future.cancel()


def _adopt(parent: int) -> None:
    """A worker's start: it ends with its parent, leaves Ctrl-C to it, runs
    torch on one thread, and makes new the locks another thread of the parent
    may have held at the fork."""
    global _owner
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent ended before the line above took effect
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    one_torch_thread.lock, one_torch_thread.users = threading.Lock(), 0
    tqdm.set_lock(TqdmDefaultWriteLock())
    torch.set_num_threads(1)
    assert _forking is not None, "workers are forked by Workers()"
    _owner, start = _forking
    if start is not None:
        start()


def _call(method: str, share: object) -> object:
    return getattr(_owner, method)(share)
