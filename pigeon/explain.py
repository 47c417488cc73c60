"""Why the model guessed what it guessed: text-tower cue scores and a class-activation heatmap.

- Cue scores: the image embedding against caption embeddings from the same CLIP's text tower
  ("cars drive on the left side", "the southern hemisphere", "a photo taken in Kenya"), cosine
  times the model's logit scale, softmaxed within each group. Caption embeddings are computed
  once per backbone and cached.
- Heatmap: Grad-CAM for the predicted cell's logit. On a vision transformer the activations are
  the tokens entering the last block's attention (its first LayerNorm: the class token's
  gradient reaches the patch tokens only through attention, so the block output itself gives a
  blank map); on a CNN (EfficientNet in `lite`, ResNets) the last spatial feature map. An
  architecture with neither falls back to gradient x input saliency on the pixels.
"""

from __future__ import annotations

import base64
import io
import math
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .calibration import softmax

DRIVING_CAPTIONS = {
    "left": "A photo of a road in a country where cars drive on the left side of the road.",
    "right": "A photo of a road in a country where cars drive on the right side of the road.",
}
HEMISPHERE_CAPTIONS = {
    "north": "A photo taken in the northern hemisphere.",
    "south": "A photo taken in the southern hemisphere.",
}
COUNTRY_CAPTION = "A photo taken in {country}."

_LN_NAMES = ("ln_1", "layer_norm1", "norm1")


@dataclass
class ActivationMap:
    """A class-activation map: `heat` (h, w) in [0, 1] at the model's feature resolution."""

    heat: np.ndarray
    method: str  # "grad-cam" | "grad-x-input"
    layer: str | None


class Explainer:
    """Cue scores and heatmaps for one backbone (and a cell-logit function over its embeddings)."""

    def __init__(self, backbone: Any, logits_fn: Callable[[torch.Tensor], torch.Tensor]):
        self.backbone = backbone
        self.logits_fn = logits_fn
        self._captions: dict[str, np.ndarray] = {}
        self._target: tuple[str, str] | None = None  # (mode, module name), found once per model
        self._lock = threading.Lock()  # hooks are per-module state: one explanation at a time

    # -- text-tower cues --------------------------------------------------------------------------
    def _caption_embeddings(self, captions: Sequence[str]) -> np.ndarray:
        missing = [c for c in captions if c not in self._captions]
        if missing:
            emb = self.backbone.embed_texts(missing)
            self._captions.update(zip(missing, emb))
        return np.stack([self._captions[c] for c in captions])

    def _logit_scale(self) -> float:
        s = getattr(self.backbone.model, "logit_scale", None)
        if callable(s) and not isinstance(s, torch.Tensor):
            s = s()
        try:
            return float(torch.as_tensor(s).detach().float().exp().clamp(max=100.0)) if s is not None else 100.0
        except Exception:
            return 100.0

    def cues(self, embedding: np.ndarray, countries: Sequence[str]) -> dict[str, Any]:
        """Cue groups for one L2-normalised image embedding (D,): each {label: probability} plus cosines."""
        emb = np.asarray(embedding, dtype=np.float32).reshape(-1)
        emb = emb / max(float(np.linalg.norm(emb)), 1e-12)
        scale = self._logit_scale()
        groups = {
            "driving_side": DRIVING_CAPTIONS,
            "hemisphere": HEMISPHERE_CAPTIONS,
        }
        names = [c for c in dict.fromkeys(countries) if c]
        if names:
            groups["country"] = {c: COUNTRY_CAPTION.format(country=c) for c in names}
        out: dict[str, Any] = {}
        for group, caps in groups.items():
            labels = list(caps)
            cos = self._caption_embeddings([caps[k] for k in labels]) @ emb
            p = softmax(cos.astype(np.float64)[None, :] * scale)[0]
            out[group] = [
                {"label": k, "caption": caps[k], "cosine": round(float(c), 5), "probability": round(float(q), 5)}
                for k, c, q in sorted(zip(labels, cos, p), key=lambda t: -t[2])
            ]
        return out

    # -- heatmap ----------------------------------------------------------------------------------
    def _find_target(self, visual: torch.nn.Module, x: torch.Tensor) -> tuple[str, str]:
        """Probe one forward pass to find the layer Grad-CAM should read: ('tokens'|'conv'|'input', name)."""
        if self._target is not None:
            return self._target
        seen: list[tuple[str, tuple[int, ...]]] = []
        hooks = []
        for name, mod in visual.named_modules():
            if not name:
                continue
            hooks.append(mod.register_forward_hook(lambda m, i, o, name=name: seen.append((name, tuple(o.shape))) if isinstance(o, torch.Tensor) else None))
        try:
            with torch.no_grad():
                self.backbone.encode_image(x)
        finally:
            for h in hooks:
                h.remove()
        target = ("input", "")
        tokens = [n for n, s in seen if len(s) == 3 and n.rsplit(".", 1)[-1] in _LN_NAMES and _grid(s[1]) is not None]
        convs = [n for n, s in seen if len(s) == 4 and s[2] > 1 and s[3] > 1]
        if tokens:
            target = ("tokens", tokens[-1])
        elif convs:
            target = ("conv", convs[-1])
        self._target = target
        return target

    def activation_map(self, image: Image.Image, cell_id: int) -> tuple[ActivationMap, np.ndarray]:
        """Grad-CAM of `cell_id`'s logit over `image`; also returns the image's normalised embedding (D,)."""
        bb = self.backbone
        model = bb.model
        visual = getattr(model, "visual", None) or getattr(getattr(model, "clip", None), "vision_model", None) or model
        x = bb.preprocess(image).unsqueeze(0).to(bb.device)
        with self._lock:
            was_training = model.training
            model.eval()
            try:
                mode, name = self._find_target(visual, x)
                return self._grad(visual, x, mode, name, int(cell_id))
            finally:
                model.train(was_training)
                model.zero_grad(set_to_none=True)

    def _grad(self, visual: torch.nn.Module, x: torch.Tensor, mode: str, name: str, cell_id: int) -> tuple[ActivationMap, np.ndarray]:
        store: dict[str, torch.Tensor] = {}
        handle = None
        if mode != "input":
            module = dict(visual.named_modules())[name]

            def keep(m, i, o):
                o.retain_grad()
                store["a"] = o

            handle = module.register_forward_hook(keep)
        else:
            x = x.clone().requires_grad_(True)
        try:
            with torch.enable_grad():
                emb = self.backbone.encode_image(x, normalize=True)
                score = self.logits_fn(emb)[0, cell_id]
                score.backward()
        finally:
            if handle is not None:
                handle.remove()
        embedding = emb.detach().float().cpu().numpy()[0]
        if mode == "input":
            sal = (x.grad * x).detach().abs().sum(1)[0]  # (H, W)
            k = max(1, sal.shape[-1] // 28)
            sal = torch.nn.functional.avg_pool2d(sal[None, None], k, k)[0, 0]
            return ActivationMap(_unit(sal.numpy()), "grad-x-input", None), embedding
        a, g = store["a"].detach()[0].float(), store["a"].grad[0].float()
        if mode == "conv":  # (C, H, W)
            w = g.mean(dim=(1, 2))
            cam = torch.einsum("c,chw->hw", w, a)
        else:  # tokens (L, D): the last gh*gw are patches, any before are class/register tokens
            gh, gw = _grid(a.shape[0])
            n = gh * gw
            ap, gp = a[-n:], g[-n:]
            cam = (ap @ gp.mean(0)).reshape(gh, gw)
        cam = cam.numpy()
        pos = np.maximum(cam, 0)
        heat = pos if pos.max() > 0 else np.abs(cam)  # an all-negative map still shows where evidence lies
        return ActivationMap(_unit(heat), "grad-cam", name), embedding


def _grid(n_tokens: int) -> tuple[int, int] | None:
    """(gh, gw) of a square patch grid inside `n_tokens` (allowing up to 8 class/register tokens)."""
    for prefix in range(0, 9):
        r = math.isqrt(n_tokens - prefix) if n_tokens > prefix else 0
        if r > 1 and r * r == n_tokens - prefix:
            return r, r
    return None


def _unit(a: np.ndarray) -> np.ndarray:
    a = np.nan_to_num(a.astype(np.float32))
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


# A perceptual blue -> yellow -> red ramp (inferno-like), 5 anchors, interpolated.
_RAMP = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)


def colorize(heat: np.ndarray) -> np.ndarray:
    """(h, w) in [0, 1] -> (h, w, 3) uint8 through the ramp."""
    t = np.clip(heat, 0, 1) * (len(_RAMP) - 1)
    i = np.minimum(t.astype(np.int64), len(_RAMP) - 2)
    f = (t - i)[..., None]
    return (_RAMP[i] * (1 - f) + _RAMP[i + 1] * f).astype(np.uint8)


def heatmap_png(image: Image.Image, heat: np.ndarray, max_side: int = 384, alpha: float = 0.5) -> tuple[bytes, int, int]:
    """The heatmap blended over the image (longest side `max_side`) as PNG bytes, with its width and height.

    The backbone sees a centre crop; the map is stretched over that same square crop region.
    """
    img = image.convert("RGB")
    w, h = img.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    side = min(max_side, s)
    crop = img.resize((side, side), Image.BILINEAR, box=box)
    hm = Image.fromarray(colorize(heat)).resize((side, side), Image.BILINEAR)
    out = Image.blend(crop, hm, alpha)
    buf = io.BytesIO()
    out.save(buf, format="PNG", optimize=False)
    return buf.getvalue(), side, side


def heatmap_base64(image: Image.Image, heat: np.ndarray, max_side: int = 384) -> dict[str, Any]:
    """JSON-ready heatmap: {png_base64, width, height}."""
    png, w, h = heatmap_png(image, heat, max_side=max_side)
    return {"png_base64": base64.b64encode(png).decode("ascii"), "width": w, "height": h}
