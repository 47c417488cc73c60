"""Batched serving: concurrent locate requests share one backbone forward.

Each request decodes its own uploads (a worker thread), then hands its images to the `Batcher`
on the event loop and awaits an asyncio future there: this is where concurrent requests meet,
whatever `max_concurrency` is, since a waiting request holds no thread and no limiter token. The
batcher runs one forward (`forward(images)`, in a worker thread) over the images of the waiting
requests, in arrival order, up to `max_images` (a request is never split: one with more images
than that goes alone), and gives each request its rows of the embeddings; each request then
finishes its answer itself (head, refinement, formatting).

When a batch starts:
- at once when the waiting requests hold `max_images` images, or when a forward slot is free and
  no other request is on its way (admitted and decoding, `on_the_way`): a lone request never waits;
- otherwise (a slot free, others decoding) it waits for them, at most `wait_ms` after the first
  waiting request arrived; `wait_ms` 0: never waits;
- while every slot (`max_running` forwards at once) is busy, requests gather; when one ends, the
  next batch starts at once with what gathered (their first arrival is past its wait).

So under load, batches form from the requests that arrived during the previous forward, and an
idle server answers a lone request with no added delay.

If a batch's forward fails and it served several requests, each request's images are forwarded
again alone, so a fault is the one request's (its exception), as without batching. A request
cancelled while it waits (client gone) leaves the queue; one cancelled during its forward is
dropped from the result.

The batcher's state lives on one event loop (it needs no lock); an app driven from a new loop
(tests that call `asyncio.run` twice) starts with a fresh state.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import anyio
import numpy as np


@dataclass(frozen=True)
class BatchStats:
    """One forward, as the batcher saw it: its size and times (seconds)."""

    images: int
    requests: int
    forward_s: float
    waited_s: tuple[float, ...]   # per request: from its arrival to the forward's start


@dataclass(frozen=True)
class Embedded:
    """A request's share of a batch: its embeddings and what its batch was."""

    embeddings: np.ndarray
    wait_ms: float       # from this request's arrival to the forward's start
    forward_ms: float    # the batch's forward
    batch_images: int
    batch_requests: int


class _Item:
    __slots__ = ("images", "future", "t")

    def __init__(self, images: Sequence[Any], future: asyncio.Future, t: float):
        self.images, self.future, self.t = images, future, t


class Batcher:
    """Gathers the images of concurrent requests into forwards of up to `max_images` (see the module doc)."""

    def __init__(self, forward: Callable[[list[Any]], np.ndarray], max_images: int, wait_ms: float, max_running: int = 1,
                 observe: Callable[[BatchStats], None] | None = None):
        if max_images < 1 or max_running < 1 or wait_ms < 0:
            raise ValueError("max_images and max_running must be >= 1, wait_ms >= 0")
        self.forward, self.max_images, self.wait_s, self.max_running = forward, max_images, wait_ms / 1000, max_running
        self.observe = observe
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reset()

    def _reset(self) -> None:
        self.pending: list[_Item] = []
        self.running = 0          # forwards in progress
        self.coming = 0           # requests on their way (decoding), announced by `on_the_way`
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task] = set()

    def _bind(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop = loop
            self._reset()
        return loop

    @property
    def waiting(self) -> int:
        """Requests waiting for a forward (for the metrics)."""
        return len(self.pending)

    @contextlib.contextmanager
    def on_the_way(self) -> Iterator[None]:
        """Around a request's decoding: while it decodes, a batch that could include it waits for it
        (at most `wait_ms` after the batch's first request arrived)."""
        self._bind()
        self.coming += 1
        try:
            yield
        finally:
            self.coming -= 1
            if not self.coming:   # nothing more is on its way: a waiting batch need not wait any longer
                self._kick()

    async def embed(self, images: Sequence[Any]) -> Embedded:
        """The embeddings of `images` (one row each), computed in a batch with other requests' images."""
        if not images:
            raise ValueError("no images to embed")
        loop = self._bind()
        item = _Item(list(images), loop.create_future(), time.perf_counter())
        self.pending.append(item)
        self._kick()
        try:
            return await item.future
        except asyncio.CancelledError:
            if item in self.pending:  # not started: leave the queue
                self.pending.remove(item)
            raise

    # -- the event-loop side --------------------------------------------------------------------
    def _kick(self) -> None:
        """Start batches while a forward slot is free and a batch is due (see the module doc)."""
        while self.pending and self.running < self.max_running:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            due = self.pending[0].t + self.wait_s
            full = sum(len(it.images) for it in self.pending) >= self.max_images
            if not full and self.coming and time.perf_counter() < due:
                self._timer = asyncio.get_running_loop().call_later(max(0.0, due - time.perf_counter()), self._on_timer)
                return
            self._start(self._take())

    def _on_timer(self) -> None:
        self._timer = None
        if self.pending and self.running < self.max_running:
            self._start(self._take())
        self._kick()

    def _take(self) -> list[_Item]:
        """The next batch: waiting requests in arrival order up to `max_images` images (at least one request)."""
        batch, n = [], 0
        while self.pending and (not batch or n + len(self.pending[0].images) <= self.max_images):
            it = self.pending.pop(0)
            batch.append(it)
            n += len(it.images)
        return batch

    def _start(self, batch: list[_Item]) -> None:
        self.running += 1
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[_Item]) -> None:
        t_start = time.perf_counter()
        try:
            outcomes, forward_s = await anyio.to_thread.run_sync(self._forward_batch, [it.images for it in batch])
        except BaseException as e:  # cancelled (the loop is closing: start nothing more) or a fault outside the forward
            self.running -= 1
            for it in batch:
                if not it.future.done():
                    it.future.set_exception(e if isinstance(e, Exception) else RuntimeError("the batch was cancelled"))
            if not isinstance(e, Exception):
                raise
            self._kick()
            return
        self.running -= 1
        self._kick()
        n_images = sum(len(it.images) for it in batch)
        waited = tuple(max(0.0, t_start - it.t) for it in batch)
        if self.observe is not None:
            self.observe(BatchStats(n_images, len(batch), forward_s, waited))
        for it, out, w in zip(batch, outcomes, waited):
            if it.future.done():  # cancelled while its forward ran
                continue
            if isinstance(out, BaseException):
                it.future.set_exception(out)
            else:
                it.future.set_result(Embedded(out, w * 1000, forward_s * 1000, n_images, len(batch)))

    def _forward_batch(self, groups: list[list[Any]]) -> tuple[list[np.ndarray | BaseException], float]:
        """(In a worker thread.) One forward over every group's images, split back per group; if it fails
        and there are several groups, each group alone, so a fault stays with its request."""
        t0 = time.perf_counter()
        images = [im for g in groups for im in g]
        try:
            emb = np.asarray(self.forward(images))
            if len(emb) != len(images):
                raise RuntimeError(f"the forward gave {len(emb)} embeddings for {len(images)} images")
        except Exception as e:
            if len(groups) == 1:
                return [e], time.perf_counter() - t0
            outcomes: list[np.ndarray | BaseException] = []
            for g in groups:
                try:
                    outcomes.append(np.asarray(self.forward(g)))
                except Exception as ge:
                    outcomes.append(ge)
            return outcomes, time.perf_counter() - t0
        bounds = np.cumsum([0] + [len(g) for g in groups])
        return [emb[a:b] for a, b in zip(bounds[:-1], bounds[1:])], time.perf_counter() - t0
