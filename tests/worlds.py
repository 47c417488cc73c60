"""Shared test fixture code: a synthetic world with cells and a zero-shot `tiny` bundle."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def world_bundle(root: Path, n_images: int, image_size: int, seed: int, min_size: int, max_size: int, zero_shot: bool = True):
    """make_world -> build_cells on its points -> bundle with cells.parquet (+ a zero-shot head).

    Returns (manifest path, manifest DataFrame, bundle path, zero-shot report or None).
    """
    import torch

    from pigeon.geocells import build_cells
    from pigeon.bundle import Bundle
    from pigeon.datasets.synthetic import make_world
    from pigeon.train import train_zero_shot

    torch.set_num_threads(2)
    manifest = make_world(root / "world", n_images=n_images, image_size=image_size, seed=seed)
    df = pd.read_csv(manifest)
    cells = build_cells(df["lat"].to_numpy(), df["lon"].to_numpy(), min_size=min_size, max_size=max_size, progress=False)
    b = Bundle(root / "bundle", create=True)
    b.write_part("cells", cells.save)
    rep = train_zero_shot(b.path, backbone="tiny") if zero_shot else None
    return manifest, df, b.path, rep


def gallery_bundle(root: Path, seed: int, n_images: int = 80, source_columns: bool = False):
    """`world_bundle` (zero-shot `tiny` head) plus a gallery index of its train photos (no validation).
    `source_columns`: the manifest first gets `with_source_columns`' url, source, license and author."""
    from pigeon.indexing import build_index

    manifest, df, bundle, _ = world_bundle(root, n_images=n_images, image_size=48, seed=seed, min_size=8, max_size=16)
    if source_columns:
        with_source_columns(df).to_csv(manifest, index=False)
    build_index(manifest, bundle, progress=False, batch_size=40, validate=False)
    return bundle


def with_source_columns(df: pd.DataFrame) -> pd.DataFrame:
    """The manifest with the optional source columns: a url per photo (every fifth left blank), its author,
    a license and the source, all derived from the row so a test can check them by the photo's key."""
    out = df.copy()
    n = len(out)
    out["url"] = [f"https://photos.example/{i}?from=<pigeon>&x=\"q\"" if i % 5 else "" for i in range(n)]
    out["author"] = [f"Author {i} <&>" for i in range(n)]
    out["license"] = ["CC-BY-4.0" if i % 2 else "CC0-1.0" for i in range(n)]
    out["source"] = "mapillary"
    return out


def cli(args: list[str]) -> int:
    """Run `pigeon ARGS` in this process; its exit code."""
    from pigeon.cli import main

    try:
        main(args)
    except SystemExit as e:
        return int(e.code or 0)
    return 0
