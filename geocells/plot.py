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
    """Draw the cells in random pastel colours with their points on top, zoomed to the points (or, without
    them, to the cells) with a margin; writes a PNG atomically."""
    rng = np.random.default_rng(0)
    colours = rng.uniform(0.35, 0.95, size=(len(cells), 3))
    fig, ax = plt.subplots(figsize=(16, 8.4))
    cells.gdf.plot(ax=ax, color=colours, edgecolor="#444444", linewidth=0.15)
    if lat is not None and lon is not None:
        ax.scatter(lon, lat, s=0.3, c="#b00020", alpha=0.5, linewidths=0)
    x0, x1, y0, y1 = plot_extent(cells, lat, lon)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_aspect("equal")
    ax.set_xlabel("longitude")
    ax.set_ylabel("latitude")
    ax.set_title(title or f"{len(cells)} geocells")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)


def plot_extent(cells: GeoCells, lat=None, lon=None, margin: float = 0.1, min_span: float = 2.0) -> tuple[float, float, float, float]:
    """(lon min, lon max, lat min, lat max) of the points (the cells' bounds without points), widened by
    `margin` of the span on each side (at least `min_span` degrees in all) and kept on the map."""
    if lat is not None and lon is not None and len(lat):
        x0, x1, y0, y1 = float(np.min(lon)), float(np.max(lon)), float(np.min(lat)), float(np.max(lat))
    else:
        x0, y0, x1, y1 = (float(v) for v in cells.gdf.total_bounds)
    pad_x = max((x1 - x0) * margin, (min_span - (x1 - x0)) / 2)
    pad_y = max((y1 - y0) * margin, (min_span - (y1 - y0)) / 2)
    return max(x0 - pad_x, -180.0), min(x1 + pad_x, 180.0), max(y0 - pad_y, -90.0), min(y1 + pad_y, 90.0)
