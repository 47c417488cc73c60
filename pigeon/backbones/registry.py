"""The backbone registry (like timm's `_registry`): spec parsing, `register_backbone`, `list_backbones`,
`get_backbone_cfg` and `create_backbone`. A name registered with a `BackboneCfg` is built through the
open_clip adapter; a prefix family brings its own builder."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Sequence

from ..core.errors import UserError
from .base import Backbone, check_device
from .config import BackboneCfg, BackboneSpec
from .openclip import _build_named
from .precision import resolve_precision

DEFAULT_SPEC = "open_clip:ViT-B-16:openai"


Builder = Callable[[BackboneSpec, str], "Backbone"]  # (parsed spec, device) -> Backbone
Parser = Callable[[str, str], BackboneSpec]  # (spec as given, text after the prefix) -> parsed spec


@dataclass(frozen=True)
class _Entry:
    """One registry row: a named config (`cfg`) or factory, or a prefix family (`parse` set)."""

    build: Builder
    forms: tuple[str, ...]
    parse: Parser | None = None
    cfg: BackboneCfg | None = None


_REGISTRY: dict[str, _Entry] = {}  # name (no ':') or prefix (ends with ':') -> entry, in registration order


def register_backbone(name_or_prefix: str, cfg_or_factory: BackboneCfg | Builder, *, parse: Parser | None = None,
                      forms: Sequence[str] | None = None, overwrite: bool = False) -> None:
    """Register a backbone under a name (`"tiny"`) or a spec family under a prefix (`"open_clip:"`).

    A name takes a `BackboneCfg` (built through open_clip) or a factory `(BackboneSpec, device) -> Backbone`.
    A prefix takes a factory; `parse(spec, rest)` checks the text after the prefix (default: any
    non-empty rest becomes `BackboneSpec(prefix, weights=rest)`); `forms` are the spec forms shown in help
    texts and by `list_backbones()`. Registering a taken name needs `overwrite=True`."""
    key = name_or_prefix.strip() if isinstance(name_or_prefix, str) else ""
    is_prefix = key.endswith(":") and key.count(":") == 1 and len(key) > 1
    if not key or (":" in key and not is_prefix) or any(c.isspace() for c in key):
        raise UserError(f"backbone name {name_or_prefix!r} is not valid; use a bare name (`mynet`) or a prefix ending in one ':' (`myhub:`)")
    if key in _REGISTRY and not overwrite:
        raise UserError(f"backbone {key!r} is already registered; choose another name or pass overwrite=True")
    if isinstance(cfg_or_factory, BackboneCfg):
        if is_prefix:
            raise UserError(f"backbone prefix {key!r} needs a factory `(BackboneSpec, device) -> Backbone`, not a BackboneCfg")
        entry = _Entry(functools.partial(_build_named, cfg_or_factory), (key,), cfg=cfg_or_factory)
    elif callable(cfg_or_factory):
        shown = tuple(forms) if forms else ((f"{key}NAME",) if is_prefix else (key,))
        entry = _Entry(cfg_or_factory, shown, parse=(parse or functools.partial(_parse_rest, key, shown)) if is_prefix else None)
    else:
        raise UserError(f"backbone {key!r}: register a BackboneCfg or a factory, not {type(cfg_or_factory).__name__}")
    _REGISTRY[key] = entry


def list_backbones() -> list[str]:
    """The registered backbone names and spec forms, in registration order (`create_backbone` takes each)."""
    return [form for entry in _REGISTRY.values() for form in entry.forms]


def get_backbone_cfg(name: str) -> BackboneCfg:
    """The `BackboneCfg` registered under `name` (e.g. to register a variant with `dataclasses.replace`)."""
    entry = _REGISTRY.get(name)
    if entry is None or entry.cfg is None:
        named = [k for k, e in _REGISTRY.items() if e.cfg is not None]
        raise UserError(f"backbone {name!r} has no registered BackboneCfg; use one of {', '.join(named)}")
    return entry.cfg


def _spec_help() -> str:
    return "use " + ", ".join(f"`{form}`" for form in list_backbones())


def _parse_rest(prefix: str, forms: tuple[str, ...], spec: str, rest: str) -> BackboneSpec:
    """Default family parser: any non-empty text after the prefix is the model's id."""
    ident = rest.strip()
    if not ident:
        raise UserError(f"backbone spec {spec!r} names no model; write {' or '.join(f'`{f}`' for f in forms)}")
    return BackboneSpec(prefix[:-1], weights=ident)


def parse_spec(spec: str) -> BackboneSpec:
    """Parse a backbone spec string against the registry; raise UserError naming the spec and the accepted forms."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"backbone spec {spec!r} is empty; {_spec_help()}")
    s = spec.strip()
    entry = _REGISTRY.get(s)
    if entry is not None and entry.parse is None:
        return BackboneSpec(s)
    for prefix in sorted((k for k, e in _REGISTRY.items() if e.parse is not None), key=len, reverse=True):
        if s.startswith(prefix):
            return _REGISTRY[prefix].parse(spec, s[len(prefix):])  # type: ignore[misc]
    raise UserError(f"backbone spec {spec!r} is not understood; {_spec_help()}")


def create_backbone(spec: str = DEFAULT_SPEC, device: str = "cpu", precision: str | None = None) -> Backbone:
    """Build the backbone a spec names, on `device`, its inference forwards in `precision` (auto/None,
    fp32, bf16, fp16: `Backbone.set_precision`). Hub weights that cannot be fetched raise UserError."""
    check_device(device)
    resolve_precision(precision, device)  # refused before anything is built
    ps = parse_spec(spec)
    key = ps.kind if ps.arch is None and ps.weights is None else f"{ps.kind}:"  # a name, or a family's prefix
    entry = _REGISTRY.get(key)
    if entry is None:  # a family parser that returned another kind
        raise UserError(f"backbone spec {spec!r} parsed to {ps}, which no registered backbone builds; {_spec_help()}")
    bb = entry.build(ps, device)
    bb.set_precision(precision)
    return bb
