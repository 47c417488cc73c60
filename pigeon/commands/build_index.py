"""`pigeon build-index`: the gallery index (FAISS), in-cell clusters and their metadata for refinement."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from pigeon.core.errors import UserError
from pigeon.core.splits import GALLERY_SPLITS, parse as parse_splits


def register(app: typer.Typer) -> None:
    @app.command("build-index")
    def build_index_cmd(
        bundle: Path = typer.Option(..., "--bundle", help="bundle folder (cells.parquet and a backbone, e.g. from `pigeon train`)"),
        images: Optional[str] = typer.Option(None, "--images", help="gallery data source: manifest (CSV/Parquet: image, lat, lon[, id]), WebDataset shards or Parquet with image bytes"),
        embeddings: Optional[Path] = typer.Option(None, "--embeddings", help="embedding folder from `pigeon embed` with the bundle's backbone (nothing is embedded)"),
        cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="embedding cache (default $PIGEON_CACHE_DIR or ~/.cache/pigeon/embeddings)"),
        append: bool = typer.Option(False, "--append", help="add the manifest's photos to the existing index without re-clustering"),
        kind: str = typer.Option("flat", "--kind", help="flat (exact), hnsw or ivf (approximate), ivfpq (IVF-PQ codes + float16 vectors: galleries of millions, built in chunks)"),
        batch_size: int = typer.Option(64, "--batch-size", help="images per backbone forward"),
        workers: int = typer.Option(0, "--workers", help="DataLoader worker processes decoding images"),
        remove_ids: Optional[Path] = typer.Option(None, "--remove-ids", help="file of gallery ids (one a line, or an `id` column) to take out"),
        device: str = typer.Option("cpu", help="torch device"),
        precision: Optional[str] = typer.Option(None, "--precision", help="backbone forwards when this run embeds: fp32 | bf16 | fp16 (default auto: bf16 on CUDA, fp16 on GPUs without bf16, fp32 on CPU)"),
        validate: Optional[bool] = typer.Option(None, "--validate/--no-validate",
                                                help="answer the manifest's split == val rows (held out of the gallery) with each refinement mode and record the best; default: when there are any"),
        splits: str = typer.Option(",".join(GALLERY_SPLITS), "--splits", help="rows that go into the gallery, by their `split` (missing: train): comma list, or 'all'; "
                                                            "test rows stay out unless listed, val rows not listed choose the refinement mode"),
    ) -> None:
        """Embed a gallery of located photos and build the index that refines answers inside cells."""
        # FAISS's OpenMP threads spin while waiting: on a busy machine PQ training ran 15x slower (docs/index.md)
        import os

        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        # imported here, not at module top: `pigeon --help` and the other commands should not pay for torch/faiss
        from pigeon.indexing import build_index, read_id_file, remove_gallery_ids

        if images is None and embeddings is None and remove_ids is None:
            raise UserError("`pigeon build-index` needs --images SOURCE or --embeddings FOLDER (to build or --append) or --remove-ids FILE")
        wanted = parse_splits(splits)
        if images is not None or embeddings is not None:
            rep = build_index(images, bundle, append=append, kind=kind, batch_size=batch_size, workers=workers, device=device,
                              validate=validate, embeddings=embeddings, cache_dir=str(cache_dir) if cache_dir else None,
                              splits=wanted, precision=precision)
            typer.echo(json.dumps(rep))
        if remove_ids is not None:
            rep = remove_gallery_ids(bundle, read_id_file(remove_ids))
            typer.echo(json.dumps(rep))
