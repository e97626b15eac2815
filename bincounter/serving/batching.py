"""Cross-request batching: requests from different clients share one forward pass.

``Batcher`` is an in-process queue in front of the network. The first waiting request opens a
batch; the batch closes when it holds ``max_batch`` images or ``max_wait_s`` has passed since it
opened, and then runs as one forward pass on the model's thread. While a pass runs, new requests
queue for the next one, so under load batches fill without waiting.

On a CPU a batch of 8 costs about 8 single passes (docs/benchmarks/serving.md), so batching is
off by default; on a GPU a batch costs little more than one image, and batching is where the
throughput comes from.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Callable

import torch


class Batcher:
    """``await batcher(images) -> probabilities`` for a ``[n, 3, H, W]`` batch of one request."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], executor: concurrent.futures.Executor,
                 max_batch: int, max_wait_s: float):
        if max_batch < 2:
            raise ValueError(f"max_batch must be >= 2 to batch anything, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.forward = forward
        self.executor = executor
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None

    async def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((images, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            size = len(batch[0][0])
            deadline = loop.time() + self.max_wait_s
            while size < self.max_batch:
                timeout = deadline - loop.time()
                try:
                    item = self._queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(self._queue.get(),
                                                                                               timeout)
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
                batch.append(item)
                size += len(item[0])
            await self._run_batch(loop, batch)

    async def _run_batch(self, loop, batch) -> None:
        try:
            probs = await loop.run_in_executor(self.executor, self.forward, torch.cat([x for x, _ in batch]))
        except Exception as e:  # noqa: BLE001 - the failure belongs to the requests, not to the worker
            for _, future in batch:
                if not future.done():
                    future.set_exception(e)
            return
        offset = 0
        for images, future in batch:
            if not future.done():  # a client that went away cancelled its future
                future.set_result(probs[offset:offset + len(images)])
            offset += len(images)

    def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
