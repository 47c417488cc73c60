"""`pigeon evaluate`: metrics, per-country table and plots of a bundle on a manifest split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from pigeon.core.errors import UserError


def register(app: typer.Typer) -> None:
    @app.command("evaluate")
    def evaluate_cmd(
        bundle: Path = typer.Option(..., "--bundle", help="bundle folder (cells + head)"),
        data: Optional[str] = typer.Option(None, "--data", help="data source: manifest (CSV/Parquet: image, lat, lon, split), WebDataset shards or Parquet with image bytes"),
        embeddings: Optional[Path] = typer.Option(None, "--embeddings", help="embedding folder from `pigeon embed` with the bundle's backbone (nothing is embedded)"),
        workers: int = typer.Option(0, "--workers", help="DataLoader worker processes decoding images"),
        split: str = typer.Option("test", "--split", help="which rows to score: train, val, test, or all"),
        out: Optional[Path] = typer.Option(None, "--out", help="folder for metrics.json, per_country.csv, predictions.csv, error_cdf.png, world_map.png, failures.png"),
        cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="embedding cache (default $PIGEON_CACHE_DIR or ~/.cache/pigeon/embeddings)"),
        device: str = typer.Option("cpu", help="torch device"),
        precision: Optional[str] = typer.Option(None, "--precision", help="backbone forwards when this run embeds: fp32 | bf16 | fp16 (default auto: bf16 on CUDA, fp16 on GPUs without bf16, fp32 on CPU)"),
        refine: Optional[str] = typer.Option(None, "--refine", help="gallery refinement: cluster+nn | cluster | nn | none, or all (every mode side by side in by_refine_mode); default: the bundle's recorded mode, else cluster+nn"),
        max_refinement_km: Optional[float] = typer.Option(None, "--max-refinement-km", help="PIGEON's guard, as `pigeon locate` (default 1000; inf = off)"),
        temperature: Optional[float] = typer.Option(None, "--temperature", help="refinement softmax temperature (default 1.6, PIGEON's street view; 0.6 for Flickr)"),
        thresholds: str = typer.Option("1,25,50,200,750,2500", "--thresholds", help="km thresholds for the within_<d>km shares, comma-separated"),
        allow_gallery_overlap: bool = typer.Option(False, "--allow-gallery-overlap", help="score photos that are also in the bundle's gallery (refused by default: they answer with their own positions)"),
        group_by: Optional[str] = typer.Option(None, "--group-by", help="a column naming each photo's place (e.g. location_id): also score one answer per place, its photos combined as views (per_place in metrics.json)"),
        combine: Optional[str] = typer.Option(None, "--combine", help="with --group-by, how a place's views combine: mean | product | both (default: the bundle's recorded mode, else mean)"),
    ) -> None:
        """Score a bundle: share within 1/25/50/200/750/2500 km, median/mean km, GeoGuessr score, country/admin-1 accuracy."""
        # imported here, not at module top: `pigeon --help` and the other commands should not pay for torch/faiss
        from pigeon.evaluate import evaluate

        try:
            km = [float(x) for x in thresholds.split(",") if x.strip()]
        except ValueError:
            raise UserError(f"--thresholds {thresholds!r}: give distances in km separated by commas, e.g. 1,25,50,200,750,2500") from None
        m = evaluate(bundle, data, split=split, out=out,
                     cache_dir=str(cache_dir) if cache_dir else None, device=device, embeddings=embeddings, workers=workers,
                     refine=refine, max_refinement_km=max_refinement_km, temperature=temperature, thresholds=km,
                     allow_gallery_overlap=allow_gallery_overlap, group_by=group_by, combine=combine, precision=precision)
        for figures in (m, m.get("per_place", {})):   # long lists: in metrics.json (--out), not on the line
            figures.pop("per_country", None)
            figures.pop("worst", None)
        typer.echo(json.dumps(m))
