"""The `Backbone` every adapter returns (encode, embed, weights, freeze policy), its weights' content hash
(`state_dict_hash`), the per-architecture tower layout the freeze policy uses, and `check_device`.
The image tower's inference precision (`Backbone.precision`) is resolved in `precision.py`."""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ..core.errors import FieldError, UserError
from ..core.progress import progress as progress_bar
from .precision import allow_tf32, autocast, resolve_precision


def check_device(device: str) -> torch.device:
    """A torch device this machine has, or a one-line `FieldError` (field `device`) saying what exists
    here; the CLI and the service settings name it as the user set it (`--device`, `PIGEON_DEVICE`)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise FieldError("device", repr(device), "is not a torch device; use cpu, cuda, cuda:N or mps") from e
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (dev.index is not None and dev.index >= n):
            have = f"this machine has {n} CUDA device(s)" + (f" (cuda:0..cuda:{n - 1})" if n else "")
            raise FieldError("device", device, f"{have}; use cpu" + (" or one of those" if n else ""))
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise FieldError("device", device, "MPS is not available on this machine; use cpu")
    return dev


class Backbone:
    """An image tower and a text tower mapping into one `embed_dim` space, with their transforms.

    `model` is an `nn.Module` whose `forward(image, text)` returns `(image_features, text_features,
    logit_scale)` (open_clip's convention), so pretraining handles every kind alike.

    `precision` ("fp32", "bf16" or "fp16"; `set_precision` resolves a request such as `auto` for the
    device, `precision.resolve_precision`) is what the image tower's inference forwards run in:
    `embed_images`, `embed_batch` (what `pigeon embed` and the embedding cache call) and everything built
    on them. Their embeddings are float32 whatever it is. `encode_image` runs as the caller sets it up
    (training forwards with gradients are fp32 unless the caller autocasts).
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
        self.precision = resolve_precision(None, self.device)  # auto: bf16 on CUDA (fp16 without bf16), fp32 elsewhere
        allow_tf32(self.device)

    def __repr__(self) -> str:
        return (f"Backbone(spec={self.spec!r}, embed_dim={self.embed_dim}, image_size={self.image_size}, device={self.device!r}, "
                f"precision={self.precision!r})")

    def set_precision(self, requested: str | None) -> str:
        """Resolve `requested` (auto/None, fp32, bf16, fp16) for this backbone's device and use it for the
        inference forwards from now on; returns what runs. A one-line `FieldError` (field `precision`) when
        the device cannot run it (fp16 on CPU, bf16 on a GPU without it)."""
        self.precision = resolve_precision(requested, self.device)
        return self.precision

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context of `self.precision` on this device (no-op for fp32)."""
        return autocast(self.precision, self.device)

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
        """Image features (B, D) for preprocessed images (B, 3, H, W); gradients flow. A pinned `x` is
        copied to the device without blocking."""
        return self.model.encode_image(x.to(self.device, non_blocking=True), normalize=normalize)

    def embed_batch(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 embeddings (B, D) on the CPU of one preprocessed batch, in `self.precision`.

        The call's caller holds eval mode and no grad (`embed_images` does; `pigeon embed` too). The
        forward runs under autocast; the features are cast to float32 before they are normalised, so a
        bf16/fp16 forward loses only the forward's own rounding."""
        with self.autocast():
            f = self.encode_image(x, normalize=False)
        return torch.nn.functional.normalize(f.float(), dim=-1).cpu()

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Text features (B, D) for token ids from `tokenize`; gradients flow."""
        return self.model.encode_text(tokens.to(self.device), normalize=normalize)

    def embed_images(self, images: Sequence[Image.Image] | torch.Tensor, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """L2-normalised float32 embeddings (n, D) of PIL images (preprocessed here) or a preprocessed tensor;
        no grad, eval mode, forwards in `self.precision`."""
        n = len(images)
        out = np.zeros((n, self.embed_dim), dtype=np.float32)
        starts: Sequence[int] | Iterator[int] = range(0, n, batch_size)
        if progress:
            starts = progress_bar(starts, desc="embed images", unit="batch")
        with self._inference():
            for s in starts:
                chunk = images[s : s + batch_size]
                x = chunk if isinstance(chunk, torch.Tensor) else torch.stack([self.preprocess(im) for im in chunk])
                out[s : s + len(x)] = self.embed_batch(x.float()).numpy()
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
        """Eval mode and no grad for the duration, then the model's previous train/eval mode back. A model
        already in eval mode (serving, embedding) is left alone: `train(mode)` walks every submodule, which
        twice per request cost ViT-B-32 ~1.5 ms, 1% of /locate (py-spy)."""
        was_training = self.model.training
        if was_training:
            self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            if was_training:
                self.model.train(True)

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
