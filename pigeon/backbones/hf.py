"""The transformers adapter (`hf:` family): a `CLIPModel` (hub id or local folder) behind open_clip's model
convention, with the checkpoint's own image processor and tokenizer, each part checked on load."""

from __future__ import annotations

import os
from typing import Any

import torch
# `transformers` is a lazy module (open_clip imports it anyway, so this line costs nothing); its CLIP
# classes (~2 s of modelling code) load on first attribute use, which only the `hf:` path makes.
import transformers
from PIL import Image

from ..core.errors import UserError
from ..datasets.augment import build_train_transform
from .base import Backbone
from .config import BackboneSpec
from .hub import _exception_chain, _first_line, _hub_unavailable, _offline_quiet


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
