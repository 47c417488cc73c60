"""Image loading: EXIF orientation applied, RGB, and unreadable files reported by path."""

from __future__ import annotations

import io
import os
import warnings
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..core.errors import UserError


def load_image(src: str | os.PathLike | bytes, name: str | None = None):
    """Open an image (a file path, or its bytes) as RGB with its EXIF orientation applied; UserError
    naming `name` (default: the path) if it is missing or unreadable."""
    label = name if name is not None else src if not isinstance(src, (bytes, bytearray, memoryview)) else "image bytes"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray, memoryview)) else src) as im:
                im = ImageOps.exif_transpose(im)
                return im.convert("RGB")
    except FileNotFoundError as e:
        raise UserError(f"image {label} does not exist; fix the manifest's `image` column or the file") from e
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        raise UserError(f"image {label} is unreadable ({type(e).__name__}: {e}); replace the file or drop its row") from e


class ImageDataset:
    """A map-style torch dataset over a manifest frame: item i is (transform(image), i).

    An unreadable image gives None (skipped by `collate`, counted in `skipped`), or a UserError
    naming it when `strict`. `seed` makes random augmentations reproducible per (seed, epoch, row),
    the same however many processes share the data."""

    def __init__(self, df: pd.DataFrame, transform: Callable, strict: bool = False, seed: int | None = None):
        if "path" not in df.columns:
            raise UserError("ImageDataset needs a frame with a `path` column; read it with pigeon.datasets.read_manifest")
        self.paths = df["path"].astype(str).to_numpy()
        self.transform = transform
        self.strict = strict
        self.seed = seed
        self.epoch = 0
        self.skipped: list[str] = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            im = load_image(self.paths[i])
        except UserError:
            if self.strict:
                raise
            self.skipped.append(str(self.paths[i]))
            return None
        if self.seed is None:
            return self.transform(im), int(i)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(np.random.SeedSequence([self.seed, self.epoch, int(i)]).generate_state(1)[0]))
            return self.transform(im), int(i)

    def __iter__(self) -> Iterator[tuple]:
        for i in range(len(self)):
            item = self[i]
            if item is not None:
                yield item

    @staticmethod
    def collate(batch: list):
        """Stack (tensor, index) pairs, dropping unreadable items: (Tensor(B,3,H,W), LongTensor(B))."""
        batch = [b for b in batch if b is not None]
        if not batch:
            return None
        return torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch], dtype=torch.long)
