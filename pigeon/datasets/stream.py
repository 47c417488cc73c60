"""Training samples streamed from a sharded data source (WebDataset tar shards, image Parquet files).

Why: tar shards and Parquet files are read front to back, not by index, so `pigeon pretrain` cannot
draw a global permutation over them as it does over a manifest. Instead, per epoch:

- the shard order is a seeded permutation (`epoch_order`), the same on every process;
- rank r of W takes the epoch's shard positions r, r+W, ...; DataLoader worker w of N takes every
  N-th of those (`positions_for`); a resumed epoch starts at position `start`;
- each worker passes its records through a seeded shuffle buffer (`ShuffleBuffer`, a few thousand
  undecoded samples), then decodes and transforms them (`load_image`) and hands over whole
  batches (`StreamBatch`); samples that do not decode are skipped and counted, and so are a shard
  that breaks off (non-strict) and the source's own skips (missing coordinates, ...);
- each batch lists the epoch positions *drained* with it: shards all of whose samples have left
  the buffer, in this batch or an earlier one of the same worker. The trainer marks them finished
  once the batch is trained on, so a checkpoint can say "the first k shards of this epoch are done"
  and a resumed run restarts at shard k, losing at most the shards in flight (those in a buffer).

Each worker ends its stream with a report batch (`images` None) carrying what is left to tell: the
last drained positions, skip counts, and in strict mode the error that stopped it (the main process
raises it, so the message names the sample rather than a worker traceback). A worker's last partial
batch is dropped (all batches have the same size, as the contrastive loss across ranks needs).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..core.errors import UserError
from ..core.splits import normalise_one as normalise_split, parse as parse_splits
from .fields import parse_heading, parse_taken_at
from .images import load_image
from .sources import Record, Source

UNREADABLE_IMAGE = "unreadable image"    # skip reasons added to the source's own (see docs/data.md)
BROKEN_SHARD = "unreadable shard (rest of it)"


def epoch_order(n_shards: int, seed: int, epoch: int) -> np.ndarray:
    """Shard indices in epoch `epoch`'s order: a seeded permutation, the same on every process."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(int(n_shards))


def positions_for(n_shards: int, start: int, rank: int, world: int, worker: int, workers: int) -> list[int]:
    """The epoch positions one loader worker reads: positions >= `start` of rank `rank` (every
    world-th), then every workers-th of those."""
    pos = np.arange(int(start), int(n_shards))
    return pos[pos % world == rank][worker::workers].tolist()


def _with_last(items: Iterator[Record]) -> Iterator[tuple[int, Record, bool]]:
    """(index, record, is_last) with one record of look-ahead: a shard can be closed as its last
    sample enters the buffer, so it counts as drained the moment that sample leaves it."""
    prev: Record | None = None
    i = -1
    for i, rec in enumerate(items):
        if prev is not None:
            yield i - 1, prev, False
        prev = rec
    if prev is not None:
        yield i, prev, True


class ShuffleBuffer:
    """A seeded shuffle buffer of (position, index, record) that tells when a shard has wholly left it."""

    def __init__(self, size: int, rng: np.random.Generator):
        self.size = max(1, int(size))
        self.rng = rng
        self.items: list[tuple[int, int, Record]] = []
        self.left: Counter[int] = Counter()   # position -> samples of it still in the buffer
        self.closed: set[int] = set()         # positions read to their end

    def __len__(self) -> int:
        return len(self.items)

    def add(self, pos: int, index: int, rec: Record) -> None:
        self.items.append((pos, index, rec))
        self.left[pos] += 1

    def close(self, pos: int) -> list[int]:
        """Shard `pos` is read to its end; [pos] when none of its samples is left in the buffer."""
        self.closed.add(pos)
        return [pos] if self.left[pos] == 0 else []

    def pop(self) -> tuple[tuple[int, int, Record], list[int]]:
        """A random item (swap-remove) and the positions drained by taking it."""
        j = int(self.rng.integers(len(self.items)))
        self.items[j], self.items[-1] = self.items[-1], self.items[j]
        item = self.items.pop()
        self.left[item[0]] -= 1
        drained = [item[0]] if self.left[item[0]] == 0 and item[0] in self.closed else []
        return item, drained


@dataclass
class StreamBatch:
    """A batch of decoded, transformed samples with their caption fields, or a worker's closing
    report (`images` None). `drained`: epoch positions whose last sample is in this batch or before."""

    images: torch.Tensor | None = None
    keys: list[str] = field(default_factory=list)
    lat: np.ndarray = field(default_factory=lambda: np.zeros(0))
    lon: np.ndarray = field(default_factory=lambda: np.zeros(0))
    taken_at: np.ndarray = field(default_factory=lambda: np.zeros(0, "datetime64[ns]"))
    heading: np.ndarray = field(default_factory=lambda: np.zeros(0))
    drained: list[int] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    bad: list[str] = field(default_factory=list)    # names of the samples skipped for an unreadable image
    error: str | None = None


class _Filling:
    """The batch a worker is filling, and what it has to report with the next batch it hands over."""

    def __init__(self) -> None:
        self.tensors: list[torch.Tensor] = []
        self.records: list[Record] = []
        self.drained: list[int] = []
        self.skipped: Counter = Counter()
        self.bad: list[str] = []

    def handover(self) -> StreamBatch:
        """The filled batch (or, with nothing filled, the report), and start afresh."""
        recs = self.records
        b = StreamBatch(
            images=torch.stack(self.tensors) if self.tensors else None, keys=[r.key for r in recs],
            lat=np.array([r.lat for r in recs], np.float64), lon=np.array([r.lon for r in recs], np.float64),
            taken_at=parse_taken_at([r.meta.get("taken_at") for r in recs]).to_numpy("datetime64[ns]"),
            heading=parse_heading([r.meta.get("heading") for r in recs]).to_numpy(np.float64),
            drained=self.drained, skipped=self.skipped, bad=self.bad)
        self.__init__()
        return b


class ShardStream(IterableDataset):
    """This rank's share of one epoch of `source` as `StreamBatch`es of `batch_size` (see the module
    docstring). Use with `DataLoader(stream, batch_size=None, num_workers=N)`."""

    def __init__(self, source: Source, transform: Callable, batch_size: int, *, seed: int = 0, epoch: int = 0,
                 start: int = 0, rank: int = 0, world: int = 1, split: str | None = "train", buffer_size: int = 2000):
        self.source, self.transform, self.batch_size = source, transform, int(batch_size)
        self.seed, self.epoch, self.start = int(seed), int(epoch), int(start)
        self.rank, self.world, self.buffer_size = int(rank), int(world), int(buffer_size)
        self.splits = parse_splits(split, "--split")   # None: every sample
        self.order = epoch_order(len(source.shards), self.seed, self.epoch)

    def _wanted(self, rec: Record) -> bool:
        """Whether the sample is of the splits read (`pigeon.core.splits`)."""
        return self.splits is None or normalise_split(rec.split) in self.splits

    def _image(self, shard: int, index: int, rec: Record) -> torch.Tensor:
        """Decoded and transformed; the random view seeded by (seed, epoch, shard, index), whoever decodes it."""
        im = load_image(rec.data, name=f"{self.source.shards[shard]} sample {rec.key}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(np.random.SeedSequence([self.seed, self.epoch, shard, index]).generate_state(1)[0]))
            return self.transform(im)

    def _read(self, pos: int, out: _Filling) -> Iterator[tuple[int, Record, bool]]:
        """Shard at epoch position `pos`: its records of the split (with is_last); the source's skips go
        to `out`; a shard that breaks off ends early, counted (strict: the error propagates)."""
        shard = int(self.order[pos])
        before = Counter(self.source.skipped)
        try:
            for index, rec, last in _with_last(self.source.records(shard)):
                if last or self._wanted(rec):
                    yield index, rec, last
        except UserError as e:
            if self.source.strict:
                raise
            out.skipped[BROKEN_SHARD] += 1
            out.bad.append(str(e))
        finally:
            out.skipped.update(Counter(self.source.skipped) - before)

    def _emit(self, item: tuple[int, int, Record], out: _Filling) -> Iterator[StreamBatch]:
        """Decode one sample into the filling batch (or count it as unreadable); hand the batch over when full."""
        pos, index, rec = item
        if not self._wanted(rec):   # a shard's last record, kept only to close the shard
            return
        shard = int(self.order[pos])
        try:
            x = self._image(shard, index, rec)
        except UserError:
            if self.source.strict:
                raise
            out.skipped[UNREADABLE_IMAGE] += 1
            out.bad.append(f"{self.source.shards[shard]} sample {rec.key}")
            return
        out.tensors.append(x)
        out.records.append(rec)
        if len(out.records) == self.batch_size:
            yield out.handover()

    def __iter__(self) -> Iterator[StreamBatch]:
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        buf = ShuffleBuffer(self.buffer_size, np.random.default_rng([self.seed, self.epoch, self.rank, w]))
        out = _Filling()
        error = None
        try:
            for pos in positions_for(len(self.order), self.start, self.rank, self.world, w, nw):
                closed = False
                for index, rec, last in self._read(pos, out):
                    buf.add(pos, index, rec)
                    if last:
                        out.drained += buf.close(pos)
                        closed = True
                    while len(buf) >= buf.size:
                        item, drained = buf.pop()
                        out.drained += drained
                        yield from self._emit(item, out)
                if not closed:                        # no record at all (or it broke off)
                    out.drained += buf.close(pos)
            while len(buf):
                item, drained = buf.pop()
                out.drained += drained
                yield from self._emit(item, out)
        except UserError as e:                        # strict: a refused sample or shard
            error = str(e)
        out.tensors, out.records = [], []             # the last partial batch is dropped
        report = out.handover()
        report.error = error
        yield report


__all__ = ["ShardStream", "StreamBatch", "ShuffleBuffer", "epoch_order", "positions_for",
           "UNREADABLE_IMAGE", "BROKEN_SHARD"]
