"""The data a backbone is described by: a parsed spec (`BackboneSpec`) and a named backbone's config
(`BackboneCfg`, like timm's `PretrainedCfg`). Plain dataclasses, imported by the registry and the adapters alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class BackboneSpec:
    """A parsed spec: `kind` is a registered name ('tiny', 'lite', ...) or a family ('open_clip', 'hf');
    `arch` and `weights` as given (open_clip: a tag, a file path or 'none'; hf: an id or a folder)."""

    kind: str
    arch: str | None = None
    weights: str | None = None

    def __str__(self) -> str:
        if self.weights is None:
            return self.kind
        if self.arch is None:
            return f"{self.kind}:{self.weights}"
        return f"{self.kind}:{self.arch}:{self.weights}"


@dataclass(frozen=True)
class BackboneCfg:
    """A named backbone as data (timm's `PretrainedCfg`): which open_clip model config to build, and how.

    arch: an open_clip model name (`open_clip.list_models()`, pigeon's `pigeon-tiny` / `pigeon-lite` included).
    pretrained: an open_clip pretrained tag or a local checkpoint file; None: random init under `seed`.
    seed: torch seed of the random init (fixed, so weights and hash are the same on every machine).
    mean, std: override the model's image normalisation.
    offline: build with the hub switched off (every weight is local), so a missing file fails at once.
    init: called with the built model, under the seeded RNG, to load weights from elsewhere (lite's trunk).
    description: one line for docs.
    """

    arch: str
    pretrained: str | None = None
    seed: int = 0
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    offline: bool = False
    init: Callable[[torch.nn.Module], None] | None = None
    description: str = ""

