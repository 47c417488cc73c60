"""`pigeon pretrain`: contrastive fine-tuning of a backbone on photos and synthetic captions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("pretrain")
    def pretrain_cmd(
        data: str = typer.Option(..., "--data", help="data source: manifest (CSV/Parquet: image, lat, lon[, taken_at, heading, split]), "
                                                     "WebDataset tar shards (folder, file or pattern such as 'shards/{00000..00099}.tar') or Parquet with image bytes"),
        cells: Path = typer.Option(..., "--cells", help="cells.parquet (from `pigeon build-cells`): regions, countries, driving side for the captions"),
        backbone: str = typer.Option("open_clip:ViT-B-16:openai", "--backbone", help="backbone spec: tiny, lite, open_clip:ARCH:TAG|/path.pt|none, hf:ID_OR_DIR"),
        out: Path = typer.Option(..., "--out", help="bundle folder; backbone.safetensors is written there"),
        epochs: int = typer.Option(1, "--epochs", help="passes over the training images"),
        batch_size: int = typer.Option(32, "--batch-size", help="global contrastive batch (all processes together)"),
        lr: float = typer.Option(1e-5, "--lr", help="peak learning rate (AdamW; linear warm-up, cosine decay)"),
        weight_decay: float = typer.Option(0.1, "--weight-decay", help="AdamW weight decay (not on norms, biases, logit scale)"),
        warmup: float = typer.Option(0.05, "--warmup", help="warm-up: a fraction of the steps (<1) or a number of steps"),
        accum: int = typer.Option(1, "--accum", help="gradient accumulation: micro-batches per optimizer step"),
        unfreeze_last: int = typer.Option(2, "--unfreeze-last", help="trainable blocks at the end of each tower (projections always train; -1: everything)"),
        oversample: float = typer.Option(0.0, "--oversample", help="rare-cell oversampling power (0 off, 0.5 weight ∝ count^-0.5, 1 cells equally likely)"),
        no_augment: bool = typer.Option(False, "--no-augment", help="no crops, jitter, erasing or noise"),
        hflip: float = typer.Option(0.0, "--hflip", help="horizontal flip probability (flips mirror the driving side the captions state)"),
        max_steps: Optional[int] = typer.Option(None, "--max-steps", help="stop after this many optimizer steps (the schedule still spans --epochs)"),
        checkpoint_every: int = typer.Option(50, "--checkpoint-every", help="optimizer steps between checkpoints (BUNDLE/pretrain/checkpoint.pt)"),
        resume: bool = typer.Option(False, "--resume", help="continue from BUNDLE/pretrain/checkpoint.pt (same options)"),
        workers: int = typer.Option(0, "--workers", help="data-loading worker processes"),
        split: str = typer.Option("train", "--split", help="samples to train on (by their split field)"),
        samples_per_epoch: Optional[int] = typer.Option(None, "--samples-per-epoch", help="WebDataset/Parquet: samples per epoch for the schedule (default: count them once before training)"),
        shuffle_buffer: int = typer.Option(2000, "--shuffle-buffer", help="WebDataset/Parquet: samples in each loader worker's shuffle buffer"),
        strict: bool = typer.Option(False, "--strict", help="refuse unreadable images instead of skipping them"),
        seed: int = typer.Option(0, "--seed", help="seed for order, augmentations and captions"),
        device: Optional[str] = typer.Option(None, "--device", help="torch device (default: cuda when there is one, else cpu)"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    ) -> None:
        """Fine-tune a CLIP-style backbone on photos and synthetic captions (symmetric InfoNCE).

        Also runs under `torchrun --nproc_per_node=N -m pigeon.cli pretrain ...` (DDP; --batch-size is global)."""
        # imported here, not at module top: `pigeon --help` should not pay for torch and open_clip
        from pigeon.pretrain import PretrainConfig, pretrain

        cfg = PretrainConfig(
            epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup=warmup, accum=accum,
            unfreeze_last=unfreeze_last, seed=seed, max_steps=max_steps, oversample=oversample, augment=not no_augment,
            hflip=hflip, num_workers=workers, checkpoint_every=checkpoint_every, strict=strict, split=split,
            samples_per_epoch=samples_per_epoch, shuffle_buffer=shuffle_buffer,
        )
        r = pretrain(data, cells, backbone, out, cfg, resume=resume, progress=not quiet, device=device)
        if r.backbone_hash is None:  # not the main process of a torchrun job
            return
        summary = {
            "bundle": r.bundle, "backbone": backbone, "backbone_hash": r.backbone_hash, "steps": r.steps,
            "first_loss": r.losses[0] if r.losses else None, "last_loss": r.losses[-1] if r.losses else None,
            "images_per_s": round(r.images_per_s, 2), "seconds": round(r.seconds, 1),
            "skipped_images": sum(r.skipped_counts.values()), "skipped": r.skipped_counts,
        }
        typer.echo(json.dumps(summary))
