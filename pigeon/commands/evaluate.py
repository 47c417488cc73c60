"""`pigeon evaluate`: metrics, per-country table and plots of a bundle on a manifest split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("evaluate")
    def evaluate_cmd(
        bundle: Path = typer.Option(..., "--bundle", help="bundle folder (cells + head)"),
        data: Optional[str] = typer.Option(None, "--data", help="data source: manifest (CSV/Parquet: image, lat, lon, split), WebDataset shards or Parquet with image bytes"),
        embeddings: Optional[Path] = typer.Option(None, "--embeddings", help="embedding folder from `pigeon embed` with the bundle's backbone (nothing is embedded)"),
        workers: int = typer.Option(0, "--workers", help="DataLoader worker processes decoding images"),
        split: str = typer.Option("test", "--split", help="which rows to score: train, val, test, or all"),
        out: Optional[Path] = typer.Option(None, "--out", help="folder for metrics.json, per_country.csv, predictions.csv, error_cdf.png, world_map.png"),
        cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="embedding cache (default $PIGEON_CACHE_DIR or ~/.cache/pigeon/embeddings)"),
        device: str = typer.Option("cpu", help="torch device"),
    ) -> None:
        """Score a bundle: share within 1/25/200/750/2500 km, median/mean km, GeoGuessr score, country/admin-1 accuracy."""
        # imported here, not at module top: `pigeon --help` and the other commands should not pay for torch/faiss
        from pigeon.evaluate import evaluate

        m = evaluate(bundle, data, split=None if split == "all" else split, out=out,
                     cache_dir=str(cache_dir) if cache_dir else None, device=device, embeddings=embeddings, workers=workers)
        m.pop("per_country", None)
        typer.echo(json.dumps(m))
