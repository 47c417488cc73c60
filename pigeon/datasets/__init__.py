"""Photo datasets: manifests (CSV/Parquet), data sources (manifest, WebDataset tar shards, image Parquet), image loading, augmentations and rare-cell sampling."""

from .augment import EpochSampler, GaussianNoise, build_train_transform, rare_cell_weights
from .images import ImageDataset, load_image
from .manifest import read_manifest
from .sources import Record, Source, open_source

__all__ = ["EpochSampler", "GaussianNoise", "ImageDataset", "build_train_transform", "load_image", "rare_cell_weights", "read_manifest",
           "open_source", "Source", "Record"]
