"""An asyncio micro-batcher: requests that arrive together are scored in one
call of the scorer, which runs on its own thread so the event loop stays free."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import Executor

import numpy as np

Score = Callable[[Sequence], tuple[np.ndarray, np.ndarray]]


class MicroBatcher:
    """Collects clips for at most `max_wait` seconds or `max_batch` clips, then
    scores them together on `executor`; `max_batch` 1 scores each request alone."""

    def __init__(self, score: Score, max_batch: int, max_wait: float, executor: Executor):
        self.score_fn, self.max_batch, self.max_wait, self.executor = score, max_batch, max_wait, executor
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        if self.max_batch > 1:
            self.queue = asyncio.Queue()
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    @property
    def waiting(self) -> int:
        return self.queue.qsize() if self.queue is not None else 0

    async def score(self, clip) -> tuple[np.ndarray, np.ndarray]:
        """One clip's (scores, embedding)."""
        loop = asyncio.get_running_loop()
        if self.queue is None:
            scores, embeddings = await loop.run_in_executor(self.executor, self.score_fn, [clip])
            return scores[0], embeddings[0]
        done = loop.create_future()
        await self.queue.put((clip, done))
        return await done

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            batch = [(clip, done) for clip, done in batch if not done.done()]  # timed-out requests left
            if batch:
                await self._score(loop, batch)

    async def _score(self, loop: asyncio.AbstractEventLoop, batch: list) -> None:
        try:
            scores, embeddings = await loop.run_in_executor(self.executor, self.score_fn, [c for c, _ in batch])
        except Exception as e:  # every waiting request gets the scorer's error
            for _, done in batch:
                if not done.done():
                    done.set_exception(e)
            return
        for (_, done), s, e in zip(batch, scores, embeddings):
            if not done.done():
                done.set_result((s, e))
