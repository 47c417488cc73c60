"""`pigeon world`: a ready zero-shot bundle over the whole Earth (no training data, no gallery)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("world")
    def world_cmd(
        out: Path = typer.Option(..., "--out", help="new bundle folder (refused if it exists and is not empty, unless --force)"),
        backbone: Optional[str] = typer.Option(None, "--backbone", help="backbone spec: lite (default, offline), hf:geolocal/StreetCLIP, open_clip:ViT-L-14:openai, tiny, ..."),
        templates: str = typer.Option("all", "--templates", help="prompt templates per cell to ensemble: a number (1 = one caption per cell) or all"),
        pretrained: Optional[Path] = typer.Option(None, "--pretrained", help="take the backbone (spec and tuned weights) from a `pigeon pretrain` bundle"),
        force: bool = typer.Option(False, "--force", help="replace a non-empty --out"),
        device: str = typer.Option("cpu", help="torch device for the text tower"),
    ) -> None:
        """Write a zero-shot bundle over the whole Earth: the bundled world cells, a CLIP's text head (a prompt ensemble per cell), no gallery."""
        # imported here, not at module top: `pigeon --help` and the other commands should not pay for torch
        from pigeon.world import build_world

        rep = build_world(out, backbone=backbone if backbone or pretrained else "lite", templates=templates, device=device,
                          force=force, pretrained=pretrained)
        typer.echo(json.dumps(rep))
