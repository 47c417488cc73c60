"""`pigeon train`: train the geocell head of a bundle (or write a zero-shot text head)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from pigeon.core.errors import UserError


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_cmd(
        bundle: Path = typer.Option(..., "--bundle", help="bundle folder holding cells.parquet (from `pigeon build-cells`)"),
        data: Optional[str] = typer.Option(None, "--data", help="data source: manifest (CSV/Parquet: image, lat, lon[, split]), WebDataset shards or Parquet with image bytes"),
        embeddings: Optional[Path] = typer.Option(None, "--embeddings", help="embedding folder from `pigeon embed` (read memory-mapped; nothing is embedded)"),
        workers: int = typer.Option(0, "--workers", help="DataLoader worker processes decoding images when this run embeds"),
        backbone: Optional[str] = typer.Option(None, "--backbone", help="backbone spec when the bundle names none (default open_clip:ViT-B-16:openai; tiny, lite, ...)"),
        zero_shot: bool = typer.Option(False, "--zero-shot", help="write a text-prototype head (one caption per cell); needs no data"),
        templates: str = typer.Option("1", "--templates", help="with --zero-shot: prompt templates per cell to ensemble, a number (1 = one caption) or all (CLIP's recipe; see docs/world.md)"),
        epochs: int = typer.Option(30, help="most epochs (early stopping on validation loss)"),
        lr: float = typer.Option(0.01, help="head learning rate (AdamW)"),
        batch_size: int = typer.Option(256, "--batch-size", help="embeddings per step"),
        tau: Optional[float] = typer.Option(None, help="haversine label smoothing temperature in km; default: half the cells' spacing (median km from a cell centre to the nearest other one; 35 on 1,005 MP-16 cells, ~5 on a few districts); PIGEOTTO used 65, PIGEON 75"),
        group_by: str = typer.Option("auto", "--group-by", help="column naming the place of each photo: views of one place stay in one split, and the view combination is chosen on val places; auto = location_id when present, none = off"),
        balanced: bool = typer.Option(False, "--balanced", help="class-balanced sampling: every cell equally likely"),
        augment: int = typer.Option(0, "--augment", help="augmented views per training photo (crop, jitter, erasing, noise; no flips)"),
        unfreeze_last_block: bool = typer.Option(False, "--unfreeze-last-block", help="also train the image tower's last block; writes backbone.safetensors"),
        init: str = typer.Option("mean", help="prototype init: mean (image means) or text (captions)"),
        patience: int = typer.Option(5, help="epochs without validation improvement before stopping"),
        samples_per_epoch: Optional[int] = typer.Option(None, "--samples-per-epoch", help="training examples per epoch (a fresh seeded draw each epoch; default: all), to validate more often on millions of photos"),
        strict: bool = typer.Option(False, "--strict", help="stop at the first bad sample instead of skipping and counting it"),
        resume: bool = typer.Option(False, "--resume", help="continue an interrupted run of the same options"),
        seed: int = typer.Option(0, help="random seed"),
        cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="embedding cache (default $PIGEON_CACHE_DIR or ~/.cache/pigeon/embeddings)"),
        device: str = typer.Option("cpu", help="torch device"),
        precision: Optional[str] = typer.Option(None, "--precision", help="backbone forwards when this run embeds: fp32 | bf16 | fp16 (default auto: bf16 on CUDA, fp16 on GPUs without bf16, fp32 on CPU)"),
    ) -> None:
        """Train the prototype head on a data source or an embedding folder (label smoothing per batch, temperature scaling, calibrated radii)."""
        # imported here, not at module top: `pigeon --help` and the other commands should not pay for torch/faiss
        from pigeon.train import TrainConfig, train, train_zero_shot

        if zero_shot:
            rep = train_zero_shot(bundle, backbone=backbone, device=device, templates=templates)
            typer.echo(f"zero-shot head written: {rep['n_cells']} cells, backbone {rep['backbone']}, {rep['templates']} template(s) per cell")
            return
        if data is None and embeddings is None:
            raise UserError("`pigeon train` needs --data SOURCE or --embeddings FOLDER (or --zero-shot for a head without training data)")
        cfg = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, tau=tau, balanced=balanced, augment=augment,
                          unfreeze_last_block=unfreeze_last_block, init=init, patience=patience, resume=resume, seed=seed,
                          cache_dir=str(cache_dir) if cache_dir else None, embeddings=str(embeddings) if embeddings else None,
                          workers=workers, strict=strict, samples_per_epoch=samples_per_epoch, group_by=group_by, precision=precision)
        rep = train(data, bundle, backbone=backbone, config=cfg, device=device)
        last = rep["history"][-1] if rep["history"] else {}
        keys = ("n_train", "n_val", "n_cells", "tau_km", "epochs_run", "best_val_loss", "temperature", "ece_before", "ece_after",
                "radius_calibration", "radius_scales", "combine_mode", "combine_validation", "skipped", "precision", "images_embedded", "embeddings_reused", "images_embedded_per_s", "head_examples_per_s")
        summary = {k: rep.get(k) for k in keys}
        summary["val_median_km"] = last.get("val_median_km")
        typer.echo(json.dumps(summary))
