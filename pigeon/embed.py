"""`pigeon embed`: a frozen backbone's embeddings of a data source, written shard by shard.

Each input shard of the source (`pigeon.datasets.open_source`) becomes one output shard of an
embedding folder (`pigeon.embeddings`). Under `torchrun --nproc-per-node N [--nnodes M]` rank r
embeds input shards r, r+N, ...; alone, one process embeds them all; the files are the same either
way. Images are decoded in DataLoader workers (`workers`): each worker takes whole shards (worker w
of W the shards w, w+W, ... of this rank, as `pigeon.datasets.stream` assigns them), so every input
shard is read once, by one worker, and up to W shards are in flight (what a kill can lose). A source
whose records cost no read (`Source.shared_reads`: a manifest's rows are in memory, each worker opens
only the image files it decodes) is instead shared: every worker decodes every W-th record of each
shard, so a manifest with fewer shards than workers still keeps all of them busy. The files are the
same whichever way, and with any number of workers. Finished shards whose input did not change are
skipped on the next run (resume, or a cache).

The backbone runs in its `precision` (`pigeon.backbones.precision`: bf16 on CUDA, fp32 on CPU by
default; `--precision`); the folder's header records it, and a folder is only ever finished at the
precision it was started with (a resume at another one is refused; the cache keeps one folder per
precision), so one folder never mixes them.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .backbones import backbone_from_bundle, check_device, create_backbone
from .backbones.precision import resolve_precision
from .bundle import Bundle
from .core.errors import UserError
from .core.splits import normalise as normalise_splits
from .core.io import pause_point
from .core.provenance import SOURCE_COLUMNS, source_text
from .core.progress import progress as progress_bar
from .datasets.fields import FIELDS, normalize_fields
from .datasets.images import load_image
from .datasets.sources import Record, Source
from .distributed import Dist, all_ok, barrier, setup_distributed, teardown
from .embeddings import OPTIONAL_COLUMNS, EmbeddingStore, ShardFiles, header_precision, read_header, write_header

UNREADABLE = "unreadable image"


@dataclass
class _Batch:
    """What a loader worker hands over: decoded images of one shard, or the end of its part of it."""

    shard: int
    pos: list[int] = field(default_factory=list)
    images: Any = field(default_factory=list)     # tensors while filling, one stacked tensor when handed over
    records: list[Record] = field(default_factory=list)
    end: bool = False
    skipped: Counter = field(default_factory=Counter)
    error: str | None = None
    parts: int = 1                                 # `end` batches that complete the shard (workers sharing it)

    def stacked(self) -> "_Batch":
        self.images = torch.stack(self.images)  # one block of shared memory between processes
        return self

    def pin_memory(self) -> "_Batch":
        """What the DataLoader's pin-memory thread calls (CUDA): the images in page-locked memory, so the
        copy to the GPU can overlap (`non_blocking`)."""
        if isinstance(self.images, torch.Tensor):
            self.images = self.images.pin_memory()
        return self


class _ShardStream(IterableDataset):
    """Decoded, transformed images of the given shards, batched inside each loader worker.

    Worker w of W takes the shards w, w+W, ... of the list, reads each once and ends it with an `end`
    batch carrying its skip counts (the source's own and the unreadable images), so the main process
    knows when a shard is complete. For a source with `shared_reads` every worker instead goes
    through every shard, decoding records w, w+W, ...; each shard then ends with W `end` batches
    (`parts`), and worker 0 alone reports the source's own skips (every worker sees them)."""

    def __init__(self, source: Source, shards: list[int], transform: Callable, batch_size: int, seed: int | None):
        self.source, self.shards, self.transform = source, shards, transform
        self.batch_size, self.seed = int(batch_size), seed

    def _image(self, shard: int, pos: int, rec: Record) -> torch.Tensor:
        im = load_image(rec.data, name=f"{self.source.spec} shard {self.source.shards[shard]} sample {rec.key}")
        if self.seed is None:
            return self.transform(im)
        with torch.random.fork_rng(devices=[]):  # a random view, the same whoever decodes it
            torch.manual_seed(int(np.random.SeedSequence([self.seed, shard, pos]).generate_state(1)[0]))
            return self.transform(im)

    def __iter__(self) -> Iterator[_Batch]:
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        shared = nw > 1 and getattr(self.source, "shared_reads", False)
        mine = self.shards if shared else self.shards[w::nw]
        parts = nw if shared else 1
        for shard in mine:
            before = Counter(self.source.skipped)
            skipped: Counter = Counter()
            cur = _Batch(shard)
            try:
                for pos, rec in enumerate(self.source.records(shard)):
                    if shared and pos % nw != w:
                        continue
                    try:
                        x = self._image(shard, pos, rec)
                    except UserError:
                        if self.source.strict:
                            raise
                        skipped[UNREADABLE] += 1
                        continue
                    cur.pos.append(pos)
                    cur.records.append(rec)
                    cur.images.append(x)
                    if len(cur.pos) == self.batch_size:
                        yield cur.stacked()
                        cur = _Batch(shard)
            except UserError as e:  # a broken shard or a refused sample: the main process raises it
                yield _Batch(shard, error=str(e), end=True, parts=parts)
                return
            if cur.pos:
                yield cur.stacked()
            if not shared or w == 0:  # shared: every worker saw the source's own skips; one reports them
                skipped.update(Counter(self.source.skipped) - before)
            yield _Batch(shard, end=True, skipped=skipped, parts=parts)


def _collate(b: _Batch) -> _Batch:
    return b


@dataclass
class _Pending:
    """A shard being assembled in the main process."""

    pos: list[np.ndarray] = field(default_factory=list)
    vecs: list[np.ndarray] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)
    ends: int = 0
    skipped: Counter = field(default_factory=Counter)


def _rows_frame(pos: np.ndarray, records: list[Record]) -> pd.DataFrame:
    """The Parquet rows of a shard: pos, key, lat, lon, split, and the optional fields present
    (taken_at, heading under the rule of `pigeon.datasets.fields`; url, source, license, author as text)."""
    df = pd.DataFrame({"pos": pos.astype(np.int64), "key": [r.key for r in records],
                       "lat": np.array([r.lat for r in records], np.float64), "lon": np.array([r.lon for r in records], np.float64),
                       "split": normalise_splits([r.split for r in records])})
    for c in OPTIONAL_COLUMNS:
        vals = [r.meta.get(c) for r in records]
        if any(v is not None for v in vals):
            df[c] = pd.Series(vals, dtype=object if c in ("location_id", *FIELDS) else None)
    if "location_id" in df.columns:
        df["location_id"] = df["location_id"].astype(str)
    for c in (c for c in SOURCE_COLUMNS if c in df.columns):
        df[c] = source_text(df[c])   # text whatever the source gave (a number, a mix): one Parquet string column
    return normalize_fields(df)


@dataclass
class EmbedReport:
    """What one process did (summed over ranks into the folder's totals by `embed`)."""

    shards_embedded: int = 0
    shards_reused: int = 0
    images: int = 0
    skipped: Counter = field(default_factory=Counter)
    seconds: float = 0.0


def _embed_shards(source: Source, backbone: Any, out: Path, todo: list[int], fingerprints: dict[int, str],
                  transform: Callable, batch_size: int, workers: int, seed: int | None, progress: bool, rep: EmbedReport) -> None:
    """Embed `todo` shards with DataLoader workers, writing each shard as soon as it is complete. On CUDA
    the loader pins its batches and the backbone copies them without blocking."""
    ds = _ShardStream(source, todo, transform, batch_size, seed)
    cuda = torch.device(backbone.device).type == "cuda"
    dl = DataLoader(ds, batch_size=None, num_workers=int(workers), collate_fn=_collate, pin_memory=cuda)
    pending: dict[int, _Pending] = {}
    bar = progress_bar(total=len(todo), desc=f"embed {source.kind} shards", unit="shard", disable=not progress)
    model = backbone.model
    model.eval()
    with torch.no_grad():
        for b in dl:
            if b.error:
                raise UserError(b.error)
            p = pending.setdefault(b.shard, _Pending())
            if b.pos:
                p.vecs.append(backbone.embed_batch(b.images.float()).numpy().astype(np.float16))  # in its precision, float32 out
                p.pos.append(np.asarray(b.pos, np.int64))
                p.records.extend(b.records)
                rep.images += len(b.pos)
            if b.end:
                p.ends += 1
                p.skipped.update(b.skipped)
                if p.ends == b.parts:
                    _finish_shard(source, out, b.shard, pending.pop(b.shard), fingerprints[b.shard], rep)
                    bar.update(1)
    bar.close()


def _finish_shard(source: Source, out: Path, shard: int, p: _Pending, fingerprint: str, rep: EmbedReport) -> None:
    """Sort a complete shard's rows by position and write it (vectors, rows, then its record)."""
    pos = np.concatenate(p.pos) if p.pos else np.zeros(0, np.int64)
    order = np.argsort(pos, kind="stable")
    vecs = np.concatenate(p.vecs)[order] if p.vecs else np.zeros((0, 0), np.float16)
    records = [p.records[i] for i in order]
    dim = vecs.shape[1] if len(vecs) else int(read_header(out)["dim"])
    vecs = vecs.reshape(len(records), dim)
    ShardFiles(out, shard).write(vecs, _rows_frame(pos[order], records),
                                 {"shard": source.shards[shard], "fingerprint": fingerprint, "skipped": dict(p.skipped)})
    rep.shards_embedded += 1
    rep.skipped.update(p.skipped)
    pause_point("embed-shard-written")


def _source_id(source: Source) -> str:
    """The source's spec with local paths made absolute (the same data set from any working folder)."""
    spec = source.describe()["spec"]
    return os.path.abspath(spec) if "://" not in spec and not spec.startswith("pipe:") else spec


def _prepare(source: Source, backbone: Any, out: Path, view: str, d: Dist) -> None:
    """Rank 0: check an existing folder is this source's under this backbone, view and precision (else
    refuse by name), drop shards past the source's end, write the header. Others wait."""
    if d.main:
        head = {"backbone_spec": backbone.spec, "backbone_hash": backbone.hash, "dim": int(backbone.embed_dim),
                "view": view, "precision": backbone.precision,
                "source": {**source.describe(), "id": _source_id(source)}, "shards": list(source.shards)}
        if (out / "embeddings.json").exists():
            old = read_header(out)
            for k, what in (("backbone_hash", "backbone"), ("view", "view"), ("dim", "dimension")):
                if old[k] != head[k]:
                    raise UserError(f"embedding folder {out} holds another {what}'s embeddings ({old.get('backbone_spec') if k == 'backbone_hash' else old[k]}); "
                                    f"give a new --out or delete the folder")
            if header_precision(old) != head["precision"]:  # finishing it now would mix two precisions in one folder
                raise UserError(f"embedding folder {out} holds {header_precision(old)} embeddings and this run embeds in {head['precision']}; "
                                f"rerun with --precision {header_precision(old)} to finish or reuse it, or give a new --out")
            if old["source"].get("id", old["source"].get("spec")) != head["source"]["id"]:
                raise UserError(f"embedding folder {out} holds embeddings of {old['source'].get('spec')}, not {source.spec}; give a new --out")
            for i in range(len(head["shards"]), len(old["shards"])):
                ShardFiles(out, i).remove()
        elif out.exists() and any(out.iterdir()):
            raise UserError(f"--out {out} exists and is not an embedding folder; give an empty or new folder")
        write_header(out, head)
    barrier(d)


def _plan(source: Source, out: Path, d: Dist, rep: EmbedReport) -> tuple[list[int], dict[int, str]]:
    """This rank's shards (r, r+world, ...) that are missing or whose input changed, and their fingerprints."""
    mine = list(range(d.rank, len(source.shards), d.world))
    fps = {i: source.fingerprint(i) for i in mine}
    todo = []
    for i in mine:
        rec = ShardFiles(out, i).record()
        if rec is not None and rec.get("shard") == source.shards[i] and rec.get("fingerprint") == fps[i]:
            rep.shards_reused += 1
        else:
            todo.append(i)
    return todo, fps


def embed_source(source: Source, backbone: Any, out: str | os.PathLike, *, batch_size: int = 64, workers: int = 0,
                 transform: Callable | None = None, view: str = "plain", seed: int | None = None,
                 progress: bool = True, dist_env: Dist | None = None) -> dict[str, Any]:
    """Embed `source` into the folder `out` (see module doc); returns this folder's totals.

    `transform` (PIL -> tensor; default the backbone's preprocessing) with a `view` name of its own
    makes an augmented view; `seed` makes a random transform reproducible per (seed, shard, sample)."""
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: give 1 or more")
    if workers < 0:
        raise UserError(f"--workers {workers}: give 0 (decode in this process) or more")
    if not source.shards:
        raise UserError(f"data source {source.spec} has no shards; check the path or pattern")
    d = dist_env or Dist()
    out = Path(out)
    t0 = time.perf_counter()
    rep = EmbedReport()
    _prepare(source, backbone, out, view, d)
    todo, fps = _plan(source, out, d, rep)
    ok, err = True, None
    try:
        _embed_shards(source, backbone, out, todo, fps, transform or backbone.preprocess, batch_size, workers, seed,
                      progress and d.main, rep)
    except UserError as e:
        ok, err = False, e
    if not all_ok(d, ok):
        raise err or UserError(f"another process of this torchrun job failed while embedding {source.spec}; see its message")
    barrier(d)
    rep.seconds = time.perf_counter() - t0
    return _summary(out, rep)


def _summary(out: Path, rep: EmbedReport) -> dict[str, Any]:
    """Totals over the finished folder (every shard's record), plus this process's own work."""
    head = read_header(out)
    total, skipped, missing = 0, Counter(), []
    for i in range(len(head["shards"])):
        rec = ShardFiles(out, i).record()
        if rec is None:
            missing.append(i)
            continue
        total += int(rec["n"])
        skipped.update(rec.get("skipped", {}))
    return {"out": str(out), "shards": len(head["shards"]), "missing_shards": missing, "vectors": total,
            "skipped": dict(skipped), "shards_embedded_here": rep.shards_embedded, "shards_reused_here": rep.shards_reused,
            "images_embedded_here": rep.images, "seconds": rep.seconds,
            "images_embedded_per_s": rep.images / rep.seconds if rep.images and rep.seconds > 0 else None,
            "backbone": head.get("backbone_spec"), "dim": head["dim"], "view": head["view"], "precision": header_precision(head)}


def embed_command(source: Source, backbone_spec: str | None, bundle: str | None, out: str | os.PathLike, *,
                  batch_size: int = 64, workers: int = 0, device: str | None = None, progress: bool = True,
                  precision: str | None = None) -> dict[str, Any]:
    """`pigeon embed`: join the torchrun job if there is one, load the backbone (its forwards in `precision`:
    auto/None, fp32, bf16, fp16), embed, leave."""
    d = setup_distributed(device)
    try:
        resolve_precision(precision, check_device(d.device))  # refused before the backbone loads
        if bundle is not None:
            b = Bundle(bundle)
            if backbone_spec and b.backbone_spec and backbone_spec != b.backbone_spec:
                raise UserError(f"bundle {b.path} uses backbone {b.backbone_spec!r}, not {backbone_spec!r}; drop --backbone")
            if not (b.backbone_spec or backbone_spec):
                raise UserError(f"bundle {b.path} names no backbone yet; give --backbone SPEC (the one you will train with)")
            bb = (backbone_from_bundle(b, device=d.device, precision=precision) if b.backbone_spec
                  else create_backbone(backbone_spec, device=d.device, precision=precision))
        else:
            if not backbone_spec:
                raise UserError("`pigeon embed` needs --backbone SPEC or --bundle DIR (whose backbone it uses)")
            bb = create_backbone(backbone_spec, device=d.device, precision=precision)
        rep = embed_source(source, bb, out, batch_size=batch_size, workers=workers, progress=progress, dist_env=d)
        rep.update(world_size=d.world, rank=d.rank)
        return rep
    finally:
        teardown(d)


def default_cache_dir() -> Path:
    """Where commands keep the embeddings they compute themselves: $PIGEON_CACHE_DIR, else ~/.cache/pigeon/embeddings."""
    env = os.environ.get("PIGEON_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "pigeon" / "embeddings"


def cached_embeddings(source: Source, backbone: Any, cache_dir: str | os.PathLike | None = None, *, view: str = "plain",
                      transform: Callable | None = None, seed: int | None = None, workers: int = 0,
                      batch_size: int = 64, progress: bool = True) -> tuple[EmbeddingStore, dict[str, Any]]:
    """The source's embeddings under `backbone` and `view`, in an embedding folder of the cache
    (one per backbone hash, source, view and precision): only shards that are new or changed are
    embedded, so train, build-index and evaluate embed each photo once per precision. fp32 keeps the
    folder name it always had (`view`), another precision has its own (`view-bf16`), so a cache
    never mixes precisions. Returns (store, embed report)."""
    key = hashlib.sha1(_source_id(source).encode()).hexdigest()[:16]
    folder = Path(cache_dir or default_cache_dir()) / backbone.hash[:24] / key / cache_folder_name(view, backbone.precision)
    rep = embed_source(source, backbone, folder, batch_size=batch_size, workers=workers, transform=transform, view=view,
                       seed=seed, progress=progress)
    return EmbeddingStore(folder, expect_backbone_hash=backbone.hash), rep


def cache_folder_name(view: str, precision: str) -> str:
    """The cache's folder of a view at a precision: `plain` (fp32, as before precisions existed), `plain-bf16`, ..."""
    return view if precision == "fp32" else f"{view}-{precision}"


def open_embeddings(folder: str | os.PathLike, backbone_hash: str | None = None) -> EmbeddingStore:
    """A finished embedding folder, memory-mapped, checked against the expected backbone."""
    return EmbeddingStore(folder, expect_backbone_hash=backbone_hash)


__all__ = ["embed_source", "embed_command", "open_embeddings", "cached_embeddings", "default_cache_dir", "EmbedReport", "UNREADABLE"]
