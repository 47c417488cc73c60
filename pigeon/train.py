"""`pigeon train`: fit the geocell head of a bundle on a manifest of photos with coordinates.

Pipeline: the bundle's cells label each photo; PIGEON's haversine label smoothing turns the label
into a soft target over all cells; the frozen backbone's embeddings are computed once and cached on
disk; the prototype head (initialised from each cell's mean image embedding, or from its caption's
text embedding) is trained with soft-target cross-entropy, with early stopping on the validation
split; one temperature is then fitted on validation (ECE reported before/after) and stored in the
head, with each cell's spread (its training photos' distances to its centre) and the uncertainty
radii's scale factors fitted on the same validation photos. `--unfreeze-last-block` trains the image
tower's last block with the head (no cache: the embeddings move) and writes the tuned backbone into
the bundle. `--zero-shot` needs no data: the head is the text embeddings of one caption per cell.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
import torch

from pigeon.core.io import atomic_path
from pigeon.core.sphere import haversine_km

from .backbones import DEFAULT_SPEC, backbone_from_bundle, create_backbone
from .backbones.precision import check_precision_name
from .bundle import Bundle
from .calibration import calibrate_radii, cell_spread_km, ece, fit_temperature, geometric_spread_km, softmax
from .core.errors import FieldError, UserError
from .core.progress import progress as progress_bar
from .core.splits import TRAIN, VAL, normalise as normalise_splits, rows_of
from .datasets import EpochSampler, build_train_transform, rare_cell_weights
from .datasets.images import load_image
from .datasets.sources import ManifestSource, Source, open_source
from .embed import cached_embeddings, open_embeddings
from .embeddings import EmbeddingStore
from .head import (BatchTargets, PrototypeHead, auto_tau_km, check_tau_km, choose_templates, mean_prototypes, text_prototypes, write_head,
                   zero_shot_scale)
from .metrics import choose_on_validation
from .places import COMBINE_MODES, DEFAULT_COMBINE, group_column, missing_places, place_codes, place_labels, place_truths
from .loading import load_cells
from .predictor import Predictor

STATE_FILE = ".train_state.pt"


@dataclass
class TrainConfig:
    """Options of `pigeon train` (see docs/train.md)."""

    epochs: int = 30
    lr: float = 0.01
    batch_size: int = 256
    tau: float | None = None         # label smoothing km; None: auto_tau_km(cell centres), half the cells' spacing
    balanced: bool = False
    augment: int = 0                 # extra augmented views per training photo (frozen) / on-the-fly (unfrozen)
    unfreeze_last_block: bool = False
    backbone_lr: float = 1e-4
    init: str = "mean"               # "mean" (image means; text for empty cells) or "text"
    patience: int = 5
    val_fraction: float = 0.1        # when the manifest has no 'val' rows
    group_by: str = "auto"           # place column: views of one place share a split; auto = location_id when present, none = off
    seed: int = 0
    resume: bool = False
    weight_decay: float = 0.0
    cache_dir: str | None = None
    embeddings: str | None = None    # an embedding folder from `pigeon embed` (instead of embedding `data` here)
    workers: int = 0                 # DataLoader workers decoding images when this run embeds
    strict: bool = False             # stop at the first bad sample (else skip and count it)
    calibration_rows: int = 20000    # most val photos for the temperature and radii fits (O(rows x cells) memory)
    samples_per_epoch: int | None = None  # examples per epoch (a seeded draw without replacement); None: all
    precision: str | None = None     # the backbone's embedding forwards: auto/None (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16
    progress: bool = True

    def check(self) -> None:
        if self.epochs < 1:
            raise UserError(f"--epochs must be at least 1, got {self.epochs}")
        if self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.tau is not None:
            try:
                check_tau_km(self.tau)
            except FieldError as e:
                raise e.renamed("--tau") from None
        if self.augment < 0:
            raise UserError(f"--augment must be 0 or more, got {self.augment}")
        if self.init not in ("mean", "text"):
            raise UserError(f"--init must be 'mean' or 'text', got {self.init!r}")
        if self.workers < 0:
            raise UserError(f"--workers must be 0 or more, got {self.workers}")
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            raise UserError(f"--samples-per-epoch must be at least 1, got {self.samples_per_epoch}")
        if self.embeddings and (self.augment or self.unfreeze_last_block):
            raise UserError("--embeddings holds plain views only: --augment and --unfreeze-last-block need the photos (give --data)")
        check_precision_name(self.precision)


def _backbone_for(bundle: Any, spec: str | None, device: str, precision: str | None = None):
    """The bundle's backbone (its embedding forwards in `precision`); set it from `spec` (or the default)
    when the bundle names none."""
    if bundle.backbone_spec is None:
        bb = create_backbone(spec or DEFAULT_SPEC, device=device, precision=precision)
        bundle.set_backbone(bb.spec, bb.hash)
        return bb
    if spec is not None and spec != bundle.backbone_spec:
        raise UserError(f"bundle {bundle.path} uses backbone {bundle.backbone_spec!r}, not {spec!r}; drop --backbone or train into a new bundle")
    return backbone_from_bundle(bundle, device=device, precision=precision)


def train_zero_shot(bundle_dir: str | os.PathLike, backbone: str | None = None, device: str = "cpu",
                    templates: int | str | None = 1) -> dict[str, Any]:
    """Write a text-prototype head: zero-shot geolocation, no data needed. `templates`: 1 = one caption
    per cell; more (or 'all') = CLIP's prompt ensemble over that many of ZERO_SHOT_TEMPLATES."""
    chosen = choose_templates(templates)
    b = Bundle(bundle_dir)
    cells = load_cells(b)
    bb = _backbone_for(b, backbone, device)
    protos = text_prototypes(bb, cells.gdf) if len(chosen) == 1 else text_prototypes(bb, cells.gdf, templates=chosen)
    head = PrototypeHead(protos, scale=zero_shot_scale(bb))
    write_head(b, head, bb.hash, init="text", trained="false", templates=len(chosen))
    return {"mode": "zero-shot", "n_cells": len(cells), "backbone": bb.spec, "embed_dim": bb.embed_dim, "templates": len(chosen)}


def place_groups(rows: pd.DataFrame, group_by: str) -> tuple[np.ndarray | None, str | None]:
    """(place label per row, the column) for `--group-by` (`pigeon.places.group_column`: "auto" takes
    `location_id` when the rows have one, "none" turns grouping off); a row without a label is a place
    of its own, and a column without any label is no grouping."""
    col = group_column(rows.columns, group_by, "the training data")
    if col is None or missing_places(rows[col]).all():
        return None, None
    return place_labels(rows[col]), col


def _splits(split: np.ndarray, cfg: TrainConfig, groups: np.ndarray | None = None, column: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the train and val rows. Without val rows a seeded share of train becomes val, whole
    places at a time when `groups` labels the places; given splits must not cut a place in two."""
    split = normalise_splits(split)
    tr = rows_of(split, TRAIN, "the training data", flag=None)
    va = np.flatnonzero(split == VAL)
    if groups is not None:
        _check_places(split, groups, column)
    if len(va) == 0:
        rng = np.random.default_rng(cfg.seed)
        if groups is None:
            perm = rng.permutation(tr)
            n_val = max(1, int(round(len(tr) * cfg.val_fraction))) if len(tr) >= 10 else 0
            va, tr = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        else:
            places = np.unique(groups[tr])
            n_val = max(1, int(round(len(places) * cfg.val_fraction))) if len(places) >= 10 else 0
            held = np.isin(groups[tr], rng.permutation(places)[:n_val])
            va, tr = tr[held], tr[~held]
    return tr, va


def _check_places(split: np.ndarray, groups: np.ndarray, column: str | None) -> None:
    """Refuse given splits that put views of one place on both sides (the place would answer for itself)."""
    frame = pd.DataFrame({"g": groups, "s": split})
    n = frame.groupby("g", sort=False)["s"].nunique()
    cut = n[n > 1]
    if len(cut):
        g = cut.index[0]
        sides = sorted(frame.loc[frame["g"] == g, "s"].unique())
        raise UserError(f"{len(cut)} places ({column}) have photos in more than one split, e.g. {g!r} in {' and '.join(sides)}: "
                        f"give all views of one place the same split (or --group-by none to split by photo)")


def _soft_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(target * torch.log_softmax(logits, dim=-1)).sum(-1).mean()


def _run_key(data: str, cfg: TrainConfig, cells_hash: str, bb_hash: str, precision: str = "fp32") -> str:
    """What `--resume` must find unchanged; `precision` is the embeddings' (the request, e.g. auto, is not)."""
    keep = {k: v for k, v in dataclasses.asdict(cfg).items()
            if k not in ("resume", "progress", "cache_dir", "epochs", "patience", "workers", "embeddings", "strict", "precision")}
    return hashlib.sha1(json.dumps([str(Path(data).resolve()), keep, cells_hash, bb_hash, precision], sort_keys=True).encode()).hexdigest()


def _per_s(count: int, seconds: float) -> float | None:
    """A rate, or None when nothing was counted or no time measured."""
    return count / seconds if count and seconds > 0 else None


@dataclass
class _Loop:
    """Where the epoch loop stands; all but the speed counters are saved for `--resume`."""

    start_epoch: int = 0
    best: float = math.inf
    best_state: dict[str, Any] | None = None
    bad_epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    n_seen: int = 0
    n_steps: int = 0
    seconds: float = 0.0


class _Strategy:
    """Where `pigeon train` runs differ by `--unfreeze-last-block`: how a batch of examples becomes
    embeddings, what trains beside the head, what a checkpoint adds, how val photos are embedded and
    what the bundle gets beside the head. `_Run` keeps the shared steps and calls these hooks."""

    caches_augmented_views = True  # `--augment` views embedded once into the cache, as extra stores

    def __init__(self, run: _Run):
        self.run = run

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimiser's parameter groups beside the head's (called once, before the optimiser exists)."""
        return []

    def embed_batch(self, examples: np.ndarray) -> torch.Tensor:
        """Embeddings of these training examples (indices into `n_views * n_train`), for the head's loss."""
        raise NotImplementedError

    def val_embeddings(self, rows: np.ndarray) -> torch.Tensor:
        """Embeddings of these val store rows (called under no_grad)."""
        raise NotImplementedError

    def set_training(self, on: bool) -> None:
        """Train or eval mode for what trains beside the head."""

    def state(self, copy: bool = False) -> dict[str, Any]:
        """What a checkpoint and the best state hold beside the head (`copy`: detached clones, kept across steps)."""
        return {}

    def load_state(self, st: dict[str, Any]) -> None:
        """Restore what `state` saved, from a checkpoint or the best state."""

    def write_backbone(self) -> None:
        """Bundle parts written before the head (the head records the backbone's hash)."""


class _FrozenEmbeddings(_Strategy):
    """Examples gathered from the views' memory maps: the backbone never runs during the epochs, so
    the embeddings are computed once (or read from `--embeddings`) and the bundle's backbone stays."""

    def embed_batch(self, examples: np.ndarray) -> torch.Tensor:
        """Each example's view row, gathered from that view's map (example e is view e // n_train)."""
        run = self.run
        rows = run.example_rows(examples)
        view = np.asarray(examples, np.int64) // len(run.tr)
        out = np.empty((len(rows), run.bb.embed_dim), np.float32)
        for v in np.unique(view):
            sel = view == v
            out[sel] = run.stores[v].take(rows[sel])
        return torch.from_numpy(out)

    def val_embeddings(self, rows: np.ndarray) -> torch.Tensor:
        """The plain view's rows, from its map."""
        return torch.from_numpy(self.run.stores[0].take(rows))


class _UnfrozenLastBlock(_Strategy):
    """`--unfreeze-last-block`: the photos are decoded again each step and the image tower's last block
    runs with gradients, trained with the head. Its embeddings move, so only the plain view is cached
    (for the initial prototypes), augmentation happens on the fly, val photos are embedded again, and
    the block's weights are checkpointed and written into the bundle as a tuned backbone."""

    caches_augmented_views = False

    def param_groups(self) -> list[dict[str, Any]]:
        """The last block's parameters, at `--backbone-lr`."""
        run = self.run
        self._unfreeze()
        module = run.bb.model.visual if hasattr(run.bb.model, "visual") else run.bb.model
        return [{"params": [p for p in module.parameters() if p.requires_grad], "lr": run.cfg.backbone_lr}]

    def _unfreeze(self) -> None:
        """The photos are decoded again each step, so find each row's file."""
        run = self.run
        if not isinstance(run.source, ManifestSource):
            raise UserError("--unfreeze-last-block reads image files each step: give --data as a manifest of files")
        run.bb.set_trainable(1)
        by_key = dict(zip(run.source.df["image"].astype(str), run.source.df["path"].astype(str)))
        self.paths = np.array([by_key[k] for k in run.stores[0].keys()], dtype=object)
        tf = build_train_transform(run.bb.image_size, run.bb.mean, run.bb.std, hflip=0.0) if run.cfg.augment else run.bb.preprocess
        self.img_tf = tf

    def embed_batch(self, examples: np.ndarray) -> torch.Tensor:
        """A forward through the unfrozen block, with gradients."""
        rows = self.run.example_rows(examples)
        x = torch.stack([self.img_tf(load_image(p)) for p in self.paths[rows]])
        return self.run.bb.encode_image(x, normalize=True)

    def val_embeddings(self, rows: np.ndarray) -> torch.Tensor:
        """Val photos embedded again by the moving block (plain preprocessing)."""
        bb = self.run.bb
        ims = [bb.preprocess(load_image(p)) for p in self.paths[rows]]
        return bb.encode_image(torch.stack(ims), normalize=True) if ims else torch.zeros(0, bb.embed_dim)

    def set_training(self, on: bool) -> None:
        self.run.bb.model.train(on)

    def state(self, copy: bool = False) -> dict[str, Any]:
        sd = self.run.bb.model.state_dict()
        return {"backbone": {k: v.detach().clone() for k, v in sd.items()} if copy else sd}

    def load_state(self, st: dict[str, Any]) -> None:
        if "backbone" in st:
            self.run.bb.model.load_state_dict(st["backbone"])

    def write_backbone(self) -> None:
        """The tuned backbone, whose new hash the head then records."""
        b, bb = self.run.bundle, self.run.bb
        bb.model.eval()
        b.write_part("backbone", bb.save_weights, spec=bb.spec, tuned="last block, by pigeon train")
        bb.invalidate_hash()
        b.set_backbone(bb.spec, bb.hash)


def _strategy_for(run: _Run) -> _Strategy:
    """The one place `--unfreeze-last-block` is read by a run."""
    return (_UnfrozenLastBlock if run.cfg.unfreeze_last_block else _FrozenEmbeddings)(run)


class _Run:
    """One `pigeon train` run, as named steps sharing the bundle, the photos and the head.

    The photos are read as embeddings from an embedding folder, memory-mapped (`--embeddings`, or
    the cache folder this run fills from `--data`): an example e of `n_views * n_train` is view
    e // n_train of train row e % n_train; batches are gathered from the maps and their soft
    targets computed per batch, so memory does not grow with the number of photos beyond the maps.
    Where `--unfreeze-last-block` changes a step, `self.strategy` (`_FrozenEmbeddings` or
    `_UnfrozenLastBlock`, chosen once) does that part."""

    def __init__(self, data: str | os.PathLike | None, bundle_dir: str | os.PathLike, backbone: str | None, cfg: TrainConfig, device: str):
        self.cfg = cfg
        self.data = str(cfg.embeddings or data)
        self.bundle = Bundle(bundle_dir)
        self.cells = load_cells(self.bundle)
        self.source: Source | None = open_source(data, strict=cfg.strict) if data is not None and not cfg.embeddings else None
        if isinstance(self.source, ManifestSource):  # refuse a manifest without train rows (or cut places) before embedding it
            _splits(self.source.df["split"].to_numpy(), cfg, *place_groups(self.source.df, cfg.group_by))
        self.bb = _backbone_for(self.bundle, backbone, device, cfg.precision)
        self.centres = np.asarray(self.cells.centres, dtype=np.float64)
        self.tau = float(cfg.tau) if cfg.tau is not None else auto_tau_km(self.centres)
        self.loop = _Loop()
        self.strategy = _strategy_for(self)

    # -- embeddings --------------------------------------------------------------------------------
    def embed(self) -> None:
        """The plain view's store (given, or embedded into the cache) plus `--augment` views; rows, splits, cells."""
        cfg, t0 = self.cfg, time.perf_counter()
        self.images_embedded, self.skipped = 0, Counter()
        if cfg.embeddings:
            self.stores = [open_embeddings(cfg.embeddings, backbone_hash=self.bb.hash)]
        else:
            self.stores = [self._cached("plain", None, None)]
            if cfg.augment and self.strategy.caches_augmented_views:
                tf = build_train_transform(self.bb.image_size, self.bb.mean, self.bb.std, hflip=0.0)
                for k in range(cfg.augment):  # each view a fixed, reproducible augmentation of every photo
                    self.stores.append(self._cached(f"aug{k}-seed{cfg.seed}", tf, cfg.seed * 1000 + k))
        store = self.stores[0]
        if len(store) == 0:
            raise UserError(f"{self.data}: no photo could be read (skipped: {dict(self.skipped)}); check the data source's paths and files")
        if any(len(s) != len(store) for s in self.stores):
            raise UserError(f"{self.data}: augmented views hold another number of photos than the plain one; clear the cache ({cfg.cache_dir or 'PIGEON_CACHE_DIR'}) and rerun")
        rows = store.rows
        self.lat, self.lon = rows["lat"].to_numpy(np.float64), rows["lon"].to_numpy(np.float64)
        self.groups, self.group_column = place_groups(rows, cfg.group_by)
        self.tr, self.va = _splits(rows["split"].to_numpy(), cfg, self.groups, self.group_column)
        self.cell = np.asarray(self.cells.cell_of(self.lat, self.lon), dtype=np.int64)
        self.n_views = len(self.stores)
        self.n_examples = self.n_views * len(self.tr)
        self.embed_seconds = time.perf_counter() - t0

    def _cached(self, view: str, transform: Callable | None, seed: int | None) -> EmbeddingStore:
        assert self.source is not None
        store, rep = cached_embeddings(self.source, self.bb, self.cfg.cache_dir, view=view, transform=transform, seed=seed,
                                       workers=self.cfg.workers, progress=self.cfg.progress)
        self.images_embedded += int(rep["images_embedded_here"])
        if view == "plain":
            self.skipped.update(rep["skipped"])
        return store

    def example_rows(self, e: np.ndarray) -> np.ndarray:
        """The store row of each training example."""
        return self.tr[np.asarray(e, np.int64) % len(self.tr)]

    # -- head, targets, optimiser ---------------------------------------------------------------------
    def init_head(self) -> None:
        """Prototypes from cell means (text for empty cells) or captions, summed over the maps in chunks; AdamW."""
        cfg, C = self.cfg, len(self.cells)
        text = None
        empty = np.bincount(self.cell[self.tr], minlength=C) == 0
        if cfg.init == "text":
            text = text_prototypes(self.bb, self.cells.gdf)
        elif empty.any():  # captions only for the cells without a training photo
            text = np.zeros((C, self.bb.embed_dim), np.float32)
            text[empty] = text_prototypes(self.bb, self.cells.gdf[empty])
        centre = None
        if cfg.init == "text":
            protos = text
        else:
            centre = self.stores[0].mean(self.tr)
            chunks = (v for _, v in self.stores[0].chunks(self.tr))
            protos = mean_prototypes(chunks, self.cell[self.tr], C, fallback=text, centre=centre)
        self.head = PrototypeHead(protos, scale=zero_shot_scale(self.bb) if cfg.init == "text" else 30.0, centre=centre)
        params = [{"params": self.head.parameters(), "lr": cfg.lr}, *self.strategy.param_groups()]
        self.opt = torch.optim.AdamW(params, weight_decay=cfg.weight_decay)

    def targets(self, rows: np.ndarray) -> torch.Tensor:
        """PIGEON's haversine-smoothed soft targets of these store rows, computed for this batch only."""
        if not hasattr(self, "_targets"):
            self._targets = BatchTargets(self.lat, self.lon, self.cell, self.centres, self.tau)
        return self._targets(rows)

    # -- resume and checkpoints ------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.bundle.path / STATE_FILE

    @property
    def run_key(self) -> str:
        return _run_key(self.data, self.cfg, self.bundle.cells_hash or "", self.bb.hash, self.stores[0].precision)

    def resume(self) -> None:
        """Continue the run saved in .train_state.pt (same data, options, cells and backbone) with `--resume`."""
        if not (self.cfg.resume and self.state_path.exists()):
            return
        st = torch.load(self.state_path, map_location="cpu", weights_only=False)
        if st.get("run_key") != self.run_key:
            raise UserError(f"{self.state_path} belongs to another run (other data, options, cells or backbone); drop --resume or delete the file")
        self.head.load_state_dict(st["head"])
        self.opt.load_state_dict(st["opt"])
        self.strategy.load_state(st)
        self.loop = _Loop(st["epoch"], st["best"], st["best_state"], st["bad_epochs"], st["history"])

    def checkpoint(self, epoch: int) -> None:
        """Save the loop's state atomically after each epoch (what `--resume` reads)."""
        lp = self.loop
        st = {"run_key": self.run_key, "head": self.head.state_dict(), "opt": self.opt.state_dict(), "epoch": epoch + 1,
              "best": lp.best, "best_state": lp.best_state, "bad_epochs": lp.bad_epochs, "history": lp.history,
              **self.strategy.state()}
        with atomic_path(self.state_path) as tmp:
            torch.save(st, tmp)

    # -- the epochs ---------------------------------------------------------------------------------------
    def val_chunks(self, rows: np.ndarray, size: int = 8192, embeddings: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(rows, uncalibrated logits) of val photos in chunks (re-embedded when the backbone trains);
        (rows, embeddings) with `embeddings`."""
        with torch.no_grad():
            for s in range(0, len(rows), size):
                r = rows[s:s + size]
                E = self.strategy.val_embeddings(r)
                yield r, (E.numpy() if embeddings else self.head(E).numpy())

    def fit(self) -> None:
        """Epochs of soft-target cross-entropy, early stopping on val loss; ends with the best state loaded."""
        cfg, lp = self.cfg, self.loop
        weights = rare_cell_weights(self.cell[self.example_rows(np.arange(self.n_examples))], power=1.0) if cfg.balanced else None
        sampler = EpochSampler(self.n_examples, seed=cfg.seed, weights=weights)
        for epoch in range(lp.start_epoch, cfg.epochs):
            sampler.set_epoch(epoch)
            rec = self.epoch(epoch, sampler.indices()[: cfg.samples_per_epoch])
            score = self.score(rec)
            lp.history.append(rec)
            if score < lp.best - 1e-6:
                lp.best, lp.bad_epochs = score, 0
                lp.best_state = {"head": {k: v.clone() for k, v in self.head.state_dict().items()}, **self.strategy.state(copy=True)}
            else:
                lp.bad_epochs += 1
            self.checkpoint(epoch)
            if lp.bad_epochs >= cfg.patience:
                break
        if lp.best_state is not None:
            self.head.load_state_dict(lp.best_state["head"])
            self.strategy.load_state(lp.best_state)
        self.head.eval()

    def epoch(self, epoch: int, order: np.ndarray) -> dict[str, float]:
        """One pass over `order` in batches of optimiser steps; returns the epoch's train loss."""
        cfg = self.cfg
        self.head.train()
        self.strategy.set_training(True)
        ts, losses = time.perf_counter(), []
        bar = progress_bar(range(0, len(order), cfg.batch_size), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=not cfg.progress, leave=False)
        for s in bar:
            ex = order[s : s + cfg.batch_size]
            loss = _soft_ce(self.head(self.strategy.embed_batch(ex)), self.targets(self.example_rows(ex)))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            losses.append(float(loss.detach()))
        self.loop.seconds += time.perf_counter() - ts
        self.loop.n_seen += len(order)
        self.loop.n_steps += len(losses)
        self.head.eval()
        self.strategy.set_training(False)
        return {"epoch": epoch + 1, "train_loss": float(np.mean(losses))}

    def score(self, rec: dict[str, float]) -> float:
        """Adds the val loss and val median km (top cell's centre) to `rec`, over val in chunks; the early-stopping score."""
        if not len(self.va):
            return rec["train_loss"]
        loss, km = 0.0, []
        for r, lv in self.val_chunks(self.va):
            loss += float(_soft_ce(torch.from_numpy(lv), self.targets(r))) * len(r)
            top = lv.argmax(1)
            km.append(haversine_km(self.centres[top, 0], self.centres[top, 1], self.lat[r], self.lon[r]))
        rec["val_loss"] = loss / len(self.va)
        rec["val_median_km"] = float(np.median(np.concatenate(km)))
        return rec["val_loss"]

    # -- calibration and output -------------------------------------------------------------------------
    def calibrate(self) -> dict[str, Any]:
        """Temperature on val (ECE before/after); each cell's spread from the train photos; the radii's
        scale factors on val (uncalibrated, and said so, without enough val photos)."""
        out: dict[str, Any] = {}
        va = self.va
        if len(va) > self.cfg.calibration_rows:  # a seeded sample: the fits need O(rows x cells) memory
            va = np.sort(np.random.default_rng(self.cfg.seed).choice(va, self.cfg.calibration_rows, replace=False))
            out["calibration_rows"] = int(len(va))
        probs = np.zeros((len(va), len(self.centres)))
        if len(va) >= 2:
            lv = np.concatenate([lv for _, lv in self.val_chunks(va)])
            y = self.cell[va]
            T = fit_temperature(lv, y)
            out.update(temperature=T, ece_before=ece(softmax(lv), y), ece_after=ece(softmax(lv, T), y))
            self.head.temperature.fill_(T)
            probs = softmax(lv, T)
        fallback = geometric_spread_km(self.cells.geoms, self.centres)
        spread = cell_spread_km(self.lat[self.tr], self.lon[self.tr], self.cell[self.tr], self.centres, fallback=fallback)
        self.head.radius, rep = calibrate_radii(spread, probs, self.lat[va], self.lon[va], self.centres)
        out.update(rep)
        return out

    def choose_combine(self) -> dict[str, Any]:
        """How views of one place combine (COMBINE_MODES), chosen like the refinement mode: val places
        with two or more views answer once per mode (no gallery: the top cell's centre), the lowest
        median km wins if it beats PIGEON's mean beyond noise (`metrics.choose_on_validation`)
        (ties and noise go to mean). {} when val has no such place."""
        if self.groups is None or not len(self.va):
            return {}
        codes, _ = place_codes(self.groups[self.va])
        rows = self.va[np.bincount(codes)[codes] >= 2]
        places = np.unique(self.groups[rows])
        if not len(places):
            return {}
        cap = max(1, self.cfg.calibration_rows // 4)  # ~4 views a place: the calibration budget
        if len(places) > cap:
            keep = np.random.default_rng(self.cfg.seed).choice(places, cap, replace=False)
            rows, places = rows[np.isin(self.groups[rows], keep)], np.sort(keep)
        emb = np.concatenate([e for _, e in self.val_chunks(rows, embeddings=True)])
        codes, labels = place_codes(self.groups[rows])
        plat, plon = place_truths(self.lat[rows], self.lon[rows], codes, len(labels))
        pred = Predictor(self.cells, self.head, self.bb)
        km = {}
        for mode in COMBINE_MODES:
            p = pred.predict_places(emb, self.groups[rows], combine=mode).arrays
            km[mode] = haversine_km(p["lat"], p["lon"], plat, plon)
        c = choose_on_validation(km, DEFAULT_COMBINE, COMBINE_MODES, self.cfg.seed)  # as the refinement mode: mean unless beaten beyond noise
        self.combine_mode = c["choice"]
        return {"combine_mode": self.combine_mode, "combine_validation": {
            "places": int(len(labels)), "views": int(len(rows)), "group_by": self.group_column,
            "median_km": c["median_km"], "within_25km": c["within_25km"], "beats_mean_share": c["beats_default_share"]}}

    def write(self) -> None:
        """The strategy's parts (the tuned backbone with `--unfreeze-last-block`), then the head, through the bundle."""
        cfg, b, bb = self.cfg, self.bundle, self.bb
        self.strategy.write_backbone()
        extra = {"combine_mode": self.combine_mode} if getattr(self, "combine_mode", None) else {}
        write_head(b, self.head, bb.hash, init=cfg.init, trained="true", tau_km=self.tau, **extra,
                   radius_calibrated=str(bool(self.head.radius is not None and self.head.radius.calibrated)).lower())

    def speeds(self) -> dict[str, Any]:
        """Each figure named for what it measures: the embedding step, and the head's optimiser steps."""
        lp = self.loop
        n_vectors = sum(len(s) for s in self.stores)
        return {
            "skipped": dict(self.skipped),                        # bad samples left out, by reason
            "precision": self.stores[0].precision,                # the backbone forwards' behind the embeddings (the folder's header)
            "embed_seconds": self.embed_seconds,
            "images_embedded": self.images_embedded,              # backbone forwards in this run
            "embeddings_reused": n_vectors - self.images_embedded,  # read from an embedding folder or the cache
            "images_embedded_per_s": _per_s(self.images_embedded, self.embed_seconds),
            "train_seconds": lp.seconds,
            "head_steps_per_s": _per_s(lp.n_steps, lp.seconds),
            "head_examples_per_s": _per_s(lp.n_seen, lp.seconds),  # training examples through the head
        }


def train(
    data: str | os.PathLike | None,
    bundle_dir: str | os.PathLike,
    backbone: str | None = None,
    config: TrainConfig | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train the bundle's head on `data` (any data source) or on `config.embeddings` (an embedding
    folder); returns a report (also saved as train_report.json)."""
    cfg = config or TrainConfig()
    cfg.check()
    if data is None and not cfg.embeddings:
        raise UserError("`pigeon train` needs --data SOURCE or --embeddings FOLDER (or --zero-shot for a head without training data)")
    torch.manual_seed(cfg.seed)
    run = _Run(data, bundle_dir, backbone, cfg, device)
    run.embed()
    run.init_head()
    run.resume()
    run.fit()
    report: dict[str, Any] = {"n_train": int(len(run.tr)), "n_val": int(len(run.va)), "n_cells": len(run.cells),
                              "backbone": run.bb.spec, "epochs_run": len(run.loop.history), "history": run.loop.history}
    report.update(run.calibrate())
    report.update(run.choose_combine(), tau_km=run.tau, tau_source="given" if cfg.tau is not None else "auto (cell spacing)")
    run.write()
    report.update(run.speeds(), best_val_loss=run.loop.best if math.isfinite(run.loop.best) else None)
    with atomic_path(run.bundle.path / "train_report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    return report


__all__ = ["TrainConfig", "train", "train_zero_shot"]
