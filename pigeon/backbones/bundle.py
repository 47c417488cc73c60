"""A bundle's backbone: its spec built through the registry, with the bundle's fine-tuned weights loaded
and their hash checked against the manifest."""

from __future__ import annotations

from ..bundle import Bundle
from ..core.errors import UserError
from .base import Backbone
from .registry import create_backbone


def backbone_from_bundle(bundle: Bundle, device: str = "cpu", precision: str | None = None) -> Backbone:
    """The bundle's backbone: its spec, with `backbone.safetensors` loaded when the bundle has one.

    The loaded weights' hash must equal the manifest's, or the bundle is refused by name. `precision`:
    as `create_backbone`."""
    spec = bundle.backbone_spec
    if spec is None:
        raise UserError(f"bundle {bundle.path} names no backbone; run `pigeon pretrain --out {bundle.path}` or `pigeon train --backbone SPEC`")
    bb = create_backbone(spec, device=device, precision=precision)
    if bundle.has("backbone"):
        bb.load_weights(bundle.part_path("backbone"))
        want = bundle.backbone_hash
        if want and bb.hash != want:
            raise UserError(
                f"bundle {bundle.path}: backbone.safetensors has hash {bb.hash[:12]} but the manifest says {want[:12]}; rerun `pigeon pretrain --out {bundle.path}`"
            )
    return bb
