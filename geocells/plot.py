"""A map of geocells and their points (matplotlib, no basemap: the cells are the map)."""

from __future__ import annotations

import os

import matplotlib
import numpy as np

matplotlib.use("Agg")  # this module only writes files: no display needed (or wanted on a server)
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from pigeon.core.io import atomic_path  # noqa: E402

from .cells import GeoCells  # noqa: E402


def plot_cells(cells: GeoCells, path: str | os.PathLike, lat=None, lon=None, title: str | None = None, dpi: int = 150) -> None:
    """Draw the cells in random pastel colours with their points on top; writes a PNG atomically."""
    rng = np.random.default_rng(0)
    colours = rng.uniform(0.35, 0.95, size=(len(cells), 3))
    fig, ax = plt.subplots(figsize=(16, 8.4))
    cells.gdf.plot(ax=ax, color=colours, edgecolor="#444444", linewidth=0.15)
    if lat is not None and lon is not None:
        ax.scatter(lon, lat, s=0.3, c="#b00020", alpha=0.5, linewidths=0)
    ax.set_xlim(-180, 180)
    ax.set_ylim(-90, 90)
    ax.set_aspect("equal")
    ax.set_xlabel("longitude")
    ax.set_ylabel("latitude")
    ax.set_title(title or f"{len(cells)} geocells")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
