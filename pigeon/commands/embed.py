"""`pigeon embed`: a frozen backbone's embeddings of a data source, as resumable shards on disk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("embed")
    def embed_cmd(
        data: str = typer.Option(..., "--data", help="data source: a manifest (CSV/Parquet of image paths), WebDataset tar shards "
                                                     "(folder, file or brace pattern such as 'shards/{00000..00099}.tar') or Parquet files with image bytes"),
        out: Path = typer.Option(..., "--out", help="embedding folder to write (or resume)"),
        backbone: Optional[str] = typer.Option(None, "--backbone", help="backbone spec (tiny, lite, open_clip:ARCH:TAG, hf:ID)"),
        bundle: Optional[Path] = typer.Option(None, "--bundle", help="take the backbone of this bundle (its tuned weights included)"),
        batch_size: int = typer.Option(64, "--batch-size", help="images per backbone forward"),
        workers: int = typer.Option(0, "--workers", help="DataLoader worker processes decoding images"),
        rows_per_shard: int = typer.Option(4096, "--rows-per-shard", help="manifest sources: rows per output shard (what a kill can lose)"),
        image_field: Optional[str] = typer.Option(None, "--image-field", help="WebDataset: the image member's extension (jpg, webp); Parquet: the image column (default: detected)"),
        lat_field: Optional[str] = typer.Option(None, "--lat-field", help="latitude key in the .json / Parquet column (default: lat or latitude)"),
        lon_field: Optional[str] = typer.Option(None, "--lon-field", help="longitude key in the .json / Parquet column (default: lon, lng or longitude)"),
        strict: bool = typer.Option(False, "--strict", help="stop at the first bad sample instead of skipping and counting it"),
        device: Optional[str] = typer.Option(None, help="torch device (default: cuda:LOCAL_RANK when there is a GPU, else cpu)"),
        precision: Optional[str] = typer.Option(None, "--precision", help="backbone forwards: fp32 | bf16 | fp16 (default auto: bf16 on CUDA, fp16 on GPUs without bf16, fp32 on CPU); recorded in the folder, which is finished at the precision it was started with"),
        quiet: bool = typer.Option(False, "-q", "--quiet", help="no progress bar"),
    ) -> None:
        """Embed a data source shard by shard; run it again to resume; under torchrun each rank takes its own shards."""
        # imported here, not at module top: `pigeon --help` and the other commands should not pay for torch
        from pigeon.datasets.sources import open_source
        from pigeon.embed import embed_command

        fields = {"image_key": image_field, "image_column": image_field, "lat_key": lat_field, "lat_column": lat_field,
                  "lon_key": lon_field, "lon_column": lon_field}  # each reader takes the names it knows
        src = open_source(data, strict=strict, rows_per_shard=rows_per_shard, **{k: v for k, v in fields.items() if v})
        rep = embed_command(src, backbone, str(bundle) if bundle else None, out, batch_size=batch_size, workers=workers,
                            device=device, progress=not quiet, precision=precision)
        if rep.get("rank", 0) == 0:
            typer.echo(json.dumps(rep))
