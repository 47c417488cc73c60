"""`pigeon train`: fit the geocell head of a bundle on a manifest of photos with coordinates.

Pipeline: the bundle's cells label each photo; PIGEON's haversine label smoothing turns the label
into a soft target over all cells; the frozen backbone's embeddings are computed once and cached on
disk; the prototype head (initialised from each cell's mean image embedding, or from its caption's
text embedding) is trained with soft-target cross-entropy, with early stopping on the validation
split; one temperature is then fitted on validation (ECE reported before/after) and stored in the
head. `--unfreeze-last-block` trains the image tower's last block with the head (no cache: the
embeddings move) and writes the tuned backbone into the bundle. `--zero-shot` needs no data: the
head is the text embeddings of one caption per cell.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pigeon.core.io import atomic_path
from pigeon.core.sphere import haversine_km

from .core.errors import UserError

STATE_FILE = ".train_state.pt"


@dataclass
class TrainConfig:
    """Options of `pigeon train` (see docs/train.md)."""

    epochs: int = 30
    lr: float = 0.01
    batch_size: int = 256
    tau: float = 65.0
    balanced: bool = False
    augment: int = 0                 # extra augmented views per training photo (frozen) / on-the-fly (unfrozen)
    unfreeze_last_block: bool = False
    backbone_lr: float = 1e-4
    init: str = "mean"               # "mean" (image means; text for empty cells) or "text"
    patience: int = 5
    val_fraction: float = 0.1        # when the manifest has no 'val' rows
    seed: int = 0
    resume: bool = False
    weight_decay: float = 0.0
    cache_dir: str | None = None
    progress: bool = True

    def check(self) -> None:
        if self.epochs < 1:
            raise UserError(f"--epochs must be at least 1, got {self.epochs}")
        if self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.tau <= 0:
            raise UserError(f"--tau must be positive (km), got {self.tau}")
        if self.augment < 0:
            raise UserError(f"--augment must be 0 or more, got {self.augment}")
        if self.init not in ("mean", "text"):
            raise UserError(f"--init must be 'mean' or 'text', got {self.init!r}")


def _load_cells(bundle: Any):
    from pigeon.geocells import GeoCells

    bundle.require("cells")
    return GeoCells.load(bundle.part_path("cells"))


def _backbone_for(bundle: Any, spec: str | None, device: str):
    """The bundle's backbone; set it from `spec` (or the default) when the bundle names none."""
    from .backbones import DEFAULT_SPEC, backbone_from_bundle, create_backbone

    if bundle.backbone_spec is None:
        bb = create_backbone(spec or DEFAULT_SPEC, device=device)
        bundle.set_backbone(bb.spec, bb.hash)
        return bb
    if spec is not None and spec != bundle.backbone_spec:
        raise UserError(f"bundle {bundle.path} uses backbone {bundle.backbone_spec!r}, not {spec!r}; drop --backbone or train into a new bundle")
    return backbone_from_bundle(bundle, device=device)


def _zero_shot_scale(bb: Any) -> float:
    ls = getattr(bb.model, "logit_scale", None)
    try:
        return float(min(ls.exp().item(), 100.0)) if ls is not None else 100.0
    except Exception:
        return 100.0


def train_zero_shot(bundle_dir: str | os.PathLike, backbone: str | None = None, device: str = "cpu") -> dict[str, Any]:
    """Write a text-prototype head (one caption per cell): zero-shot geolocation, no data needed."""
    from .bundle import Bundle
    from .head import PrototypeHead, text_prototypes, write_head

    b = Bundle(bundle_dir)
    cells = _load_cells(b)
    bb = _backbone_for(b, backbone, device)
    protos = text_prototypes(bb, cells.gdf)
    head = PrototypeHead(protos, scale=_zero_shot_scale(bb))
    write_head(b, head, bb.hash, init="text", trained="false")
    return {"mode": "zero-shot", "n_cells": len(cells), "backbone": bb.spec, "embed_dim": bb.embed_dim}


def _splits(df, cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    split = df["split"].astype(str).str.lower().to_numpy()
    tr = np.flatnonzero(split == "train")
    va = np.flatnonzero(split == "val")
    if len(tr) == 0:
        raise UserError("manifest has no rows with split 'train'; add a `split` column with train/val/test (or leave it out: all rows train)")
    if len(va) == 0:
        rng = np.random.default_rng(cfg.seed)
        perm = rng.permutation(tr)
        n_val = max(1, int(round(len(tr) * cfg.val_fraction))) if len(tr) >= 10 else 0
        va, tr = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    return tr, va


def _soft_ce(logits, target):
    import torch

    return -(target * torch.log_softmax(logits, dim=-1)).sum(-1).mean()


def _run_key(data: str, cfg: TrainConfig, cells_hash: str, bb_hash: str) -> str:
    keep = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("resume", "progress", "cache_dir", "epochs", "patience")}
    return hashlib.sha1(json.dumps([str(Path(data).resolve()), keep, cells_hash, bb_hash], sort_keys=True).encode()).hexdigest()


def train(
    data: str | os.PathLike,
    bundle_dir: str | os.PathLike,
    backbone: str | None = None,
    config: TrainConfig | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train the bundle's head on `data` (a manifest); returns a report (also saved as train_report.json)."""
    import torch

    from .bundle import Bundle
    from .calibration import ece, fit_temperature, softmax
    from .datasets import read_manifest
    from .embed_cache import embed_paths
    from .head import PrototypeHead, mean_prototypes, smoothed_targets, text_prototypes, write_head

    cfg = config or TrainConfig()
    cfg.check()
    torch.manual_seed(cfg.seed)
    b = Bundle(bundle_dir)
    cells = _load_cells(b)
    df = read_manifest(data)
    bb = _backbone_for(b, backbone, device)
    C = len(cells)
    centres = np.asarray(cells.centres, dtype=np.float64)
    tr, va = _splits(df, cfg)
    lat, lon = df["lat"].to_numpy(), df["lon"].to_numpy()
    cell = np.asarray(cells.cell_of(lat, lon), dtype=np.int64)
    paths = df["path"].astype(str).tolist()
    t0 = time.perf_counter()

    # -- embeddings (frozen backbone, cached) ------------------------------------------------------
    def emb_of(idx: np.ndarray, view: str = "plain", transform=None) -> np.ndarray:
        return embed_paths(bb, [paths[i] for i in idx], cache_dir=cfg.cache_dir, progress=cfg.progress, transform=transform, view=view)

    E_tr = emb_of(tr)
    E_va = emb_of(va) if len(va) else np.zeros((0, bb.embed_dim), np.float32)
    views_idx = [tr]
    views_emb = [E_tr]
    if cfg.augment and not cfg.unfreeze_last_block:
        from .datasets import build_train_transform

        tf = build_train_transform(bb.image_size, bb.mean, bb.std, hflip=0.0)
        for k in range(cfg.augment):
            torch.manual_seed(cfg.seed * 1000 + k)  # each view is a fixed, reproducible augmentation
            views_idx.append(tr)
            views_emb.append(emb_of(tr, view=f"aug{k}-seed{cfg.seed}", transform=tf))
    X_idx = np.concatenate(views_idx)
    X = torch.from_numpy(np.concatenate(views_emb, 0))
    t_embed = time.perf_counter() - t0

    # -- head init ---------------------------------------------------------------------------------
    text = None
    if cfg.init == "text" or np.bincount(cell[tr], minlength=C).min() == 0:
        text = text_prototypes(bb, cells.gdf)
    centre = None if cfg.init == "text" else E_tr.mean(0)
    protos = text if cfg.init == "text" else mean_prototypes(E_tr, cell[tr], C, fallback=text, centre=centre)
    head = PrototypeHead(protos, scale=_zero_shot_scale(bb) if cfg.init == "text" else 30.0, centre=centre)

    # Soft targets for every photo (train and val), from its true position.
    targets = torch.from_numpy(smoothed_targets(lat, lon, cell, centres, cfg.tau))

    params = [{"params": head.parameters(), "lr": cfg.lr}]
    if cfg.unfreeze_last_block:
        bb.set_trainable(1)
        bb_params = [p for p in bb.model.visual.parameters() if p.requires_grad] if hasattr(bb.model, "visual") else [p for p in bb.model.parameters() if p.requires_grad]
        params.append({"params": bb_params, "lr": cfg.backbone_lr})
    opt = torch.optim.AdamW(params, weight_decay=cfg.weight_decay)

    # -- resume ------------------------------------------------------------------------------------
    state_path = b.path / STATE_FILE
    run_key = _run_key(str(data), cfg, b.cells_hash or "", bb.hash)
    start_epoch, best, best_state, bad_epochs, history = 0, math.inf, None, 0, []
    if cfg.resume and state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        if st.get("run_key") != run_key:
            raise UserError(f"{state_path} belongs to another run (other data, options, cells or backbone); drop --resume or delete the file")
        head.load_state_dict(st["head"])
        opt.load_state_dict(st["opt"])
        if cfg.unfreeze_last_block and "backbone" in st:
            bb.model.load_state_dict(st["backbone"])
        start_epoch, best, best_state, bad_epochs, history = st["epoch"], st["best"], st["best_state"], st["bad_epochs"], st["history"]

    from .datasets import EpochSampler, rare_cell_weights

    weights = rare_cell_weights(cell[X_idx], power=1.0) if cfg.balanced else None
    sampler = EpochSampler(len(X_idx), seed=cfg.seed, weights=weights)
    img_tf = None
    if cfg.unfreeze_last_block:
        from .datasets import build_train_transform, load_image

        img_tf = build_train_transform(bb.image_size, bb.mean, bb.std, hflip=0.0) if cfg.augment else bb.preprocess

    def embed_batch(rows: np.ndarray):
        if not cfg.unfreeze_last_block:
            return X[rows]
        x = torch.stack([img_tf(load_image(paths[X_idx[r]])) for r in rows])
        return bb.encode_image(x, normalize=True)

    def val_logits() -> np.ndarray:
        with torch.no_grad():
            Ev = torch.from_numpy(E_va) if not cfg.unfreeze_last_block else torch.from_numpy(
                embed_paths(bb, [paths[i] for i in va], use_cache=False, progress=False))
            return head(Ev).numpy()

    from tqdm.auto import tqdm

    n_seen, t_train = 0, 0.0
    epoch = start_epoch
    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        order = np.fromiter(iter(sampler), dtype=np.int64)
        head.train()
        if cfg.unfreeze_last_block:
            bb.model.train()
        ts = time.perf_counter()
        losses = []
        bar = tqdm(range(0, len(order), cfg.batch_size), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=not cfg.progress, leave=False)
        for s in bar:
            rows = order[s : s + cfg.batch_size]
            loss = _soft_ce(head(embed_batch(rows)), targets[X_idx[rows]])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        t_train += time.perf_counter() - ts
        n_seen += len(order)
        head.eval()
        if cfg.unfreeze_last_block:
            bb.model.eval()
        rec: dict[str, float] = {"epoch": epoch + 1, "train_loss": float(np.mean(losses))}
        if len(va):
            lv = val_logits()
            rec["val_loss"] = float(_soft_ce(torch.from_numpy(lv), targets[va]))
            top = lv.argmax(1)
            rec["val_median_km"] = float(np.median(haversine_km(centres[top, 0], centres[top, 1], lat[va], lon[va])))
            score = rec["val_loss"]
        else:
            score = rec["train_loss"]
        history.append(rec)
        if score < best - 1e-6:
            best, bad_epochs = score, 0
            best_state = {"head": {k: v.clone() for k, v in head.state_dict().items()}}
            if cfg.unfreeze_last_block:
                best_state["backbone"] = {k: v.detach().clone() for k, v in bb.model.state_dict().items()}
        else:
            bad_epochs += 1
        st = {"run_key": run_key, "head": head.state_dict(), "opt": opt.state_dict(), "epoch": epoch + 1, "best": best,
              "best_state": best_state, "bad_epochs": bad_epochs, "history": history}
        if cfg.unfreeze_last_block:
            st["backbone"] = bb.model.state_dict()
        with atomic_path(state_path) as tmp:
            torch.save(st, tmp)
        if bad_epochs >= cfg.patience:
            break

    if best_state is not None:
        head.load_state_dict(best_state["head"])
        if cfg.unfreeze_last_block and "backbone" in best_state:
            bb.model.load_state_dict(best_state["backbone"])
    head.eval()

    # -- temperature scaling on validation ------------------------------------------------------------
    report: dict[str, Any] = {"n_train": int(len(tr)), "n_val": int(len(va)), "n_cells": C, "backbone": bb.spec,
                              "epochs_run": len(history), "history": history}
    if len(va) >= 2:
        lv = val_logits()
        T = fit_temperature(lv, cell[va])
        report.update(temperature=T, ece_before=ece(softmax(lv), cell[va]), ece_after=ece(softmax(lv, T), cell[va]))
        head.temperature.fill_(T)
    if cfg.unfreeze_last_block:
        bb.model.eval()
        b.write_part("backbone", bb.save_weights, spec=bb.spec, tuned="last block, by pigeon train")
        bb.invalidate_hash()
        b.set_backbone(bb.spec, bb.hash)
    write_head(b, head, bb.hash, init=cfg.init, trained="true", tau_km=cfg.tau)
    report.update(
        embed_seconds=t_embed,
        train_seconds=t_train,
        embeddings_per_s=(n_seen / t_train) if t_train > 0 else None,
        best_val_loss=best if math.isfinite(best) else None,
    )
    with atomic_path(b.path / "train_report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    return report


__all__ = ["TrainConfig", "train", "train_zero_shot"]
