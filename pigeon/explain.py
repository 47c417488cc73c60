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

Explanations run beside other requests on the same model (the service runs up to
`max_concurrency` at once): no hook is ever attached to the shared modules (a hook there would fire
inside every concurrent forward pass, and `retain_grad` fails on a no-grad one). The activations are
captured on a per-request view of the model that shares its weights (`_private_view`), and the
gradient is taken with `torch.autograd.grad`, which writes nothing to the shared parameters.
"""

from __future__ import annotations

import base64
import contextlib
import io
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

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
# nn.Module's forward-hook tables: a view's copy of a module gets its own (see `_private_view`)
_HOOK_TABLES = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")


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
        self._lock = threading.RLock()  # the one-time target probe; explaining a model left in train mode

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
    def _find_target(self, root: torch.nn.Module, prefix: str, x: torch.Tensor) -> tuple[str, str]:
        """Probe one forward pass to find the layer Grad-CAM should read: ('tokens'|'conv'|'input', name).

        Runs once per explainer, on a private view of the model (its own hook tables), so requests
        running beside it on the shared model see no hook and record nothing here."""
        with self._lock:
            if self._target is None:
                view, copies = _private_view(root, None)
                seen: list[tuple[str, tuple[int, ...]]] = []
                for full, mod in copies.items():
                    name = _relative(full, prefix)
                    if name:
                        mod.register_forward_hook(lambda m, i, o, name=name: seen.append((name, tuple(o.shape))) if isinstance(o, torch.Tensor) else None)
                with torch.no_grad():
                    view.encode_image(x)
                self._target = _pick_target(seen)
            return self._target

    def activation_map(self, image: Image.Image, cell_id: int) -> tuple[ActivationMap, np.ndarray]:
        """Grad-CAM of `cell_id`'s logit over `image`; also returns the image's normalised embedding (D,).

        Safe beside other requests on the same model (plain `locate`s, other explanations): nothing is
        attached to the shared modules and no parameter gradient is written (see `_grad`)."""
        bb = self.backbone
        root = bb.model
        prefix = _visual_prefix(root)
        x = bb.preprocess(image).unsqueeze(0).to(bb.device)
        with _eval_mode(root, self._lock):
            mode, name = self._find_target(root, prefix, x)
            return self._grad(root, x, mode, name, _join(prefix, name), int(cell_id))

    def _grad(self, root: torch.nn.Module, x: torch.Tensor, mode: str, name: str, full_name: str, cell_id: int) -> tuple[ActivationMap, np.ndarray]:
        """One forward pass with gradients through a per-request view of the model whose copy of the
        target layer records its output, then `autograd.grad` of the cell's logit w.r.t. that output.

        The view shares every parameter and buffer with the served model but owns the modules on the
        path to the target, hence their hook tables: the hook fires for this request only. The input
        asks for a gradient, so the activations carry one even when the weights are frozen, and
        `autograd.grad` (not `backward`) leaves the parameters' `.grad` untouched."""
        x = x.clone().requires_grad_(True)
        store: dict[str, torch.Tensor] = {}
        view = root
        if mode != "input":
            view, copies = _private_view(root, [full_name])
            copies[full_name].register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
        with torch.enable_grad():
            emb = view.encode_image(x, normalize=True)
            score = self.logits_fn(emb)[0, cell_id]
            act = x if mode == "input" else store["a"]
            (grad,) = torch.autograd.grad(score, act)
        embedding = emb.detach().float().cpu().numpy()[0]
        if mode == "input":
            return _saliency(x.detach(), grad), embedding
        return _grad_cam(act.detach()[0].float(), grad[0].float(), mode, name), embedding


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module, lock: threading.RLock) -> Iterator[None]:
    """Explain in eval mode. A served model is always in eval mode (Backbone keeps it so): nothing to do,
    nothing shared touched. One left in train mode is switched for the call, one explanation at a time."""
    if not model.training:
        yield
        return
    with lock:
        model.eval()
        try:
            yield
        finally:
            model.train()


def _saliency(x: torch.Tensor, grad: torch.Tensor) -> ActivationMap:
    """Gradient x input on the pixels, summed over channels and pooled to ~28 cells a side."""
    sal = (grad * x).abs().sum(1)[0]  # (H, W)
    k = max(1, sal.shape[-1] // 28)
    sal = torch.nn.functional.avg_pool2d(sal[None, None], k, k)[0, 0]
    return ActivationMap(_unit(sal.numpy()), "grad-x-input", None)


def _grad_cam(a: torch.Tensor, g: torch.Tensor, mode: str, name: str) -> ActivationMap:
    """Grad-CAM from one image's activations `a` and their gradient `g`: (C, H, W) maps or (L, D) tokens."""
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
    return ActivationMap(_unit(heat), "grad-cam", name)


def _pick_target(seen: Sequence[tuple[str, tuple[int, ...]]]) -> tuple[str, str]:
    """From (module name, output shape) in call order: the last pre-attention LayerNorm over a token grid
    (ViT), else the last spatial feature map (CNN), else the input."""
    tokens = [n for n, s in seen if len(s) == 3 and n.rsplit(".", 1)[-1] in _LN_NAMES and _grid(s[1]) is not None]
    convs = [n for n, s in seen if len(s) == 4 and s[2] > 1 and s[3] > 1]
    if tokens:
        return ("tokens", tokens[-1])
    if convs:
        return ("conv", convs[-1])
    return ("input", "")


def _visual_prefix(root: torch.nn.Module) -> str:
    """Dotted name of the image tower inside the model: 'visual' (open_clip), 'clip.vision_model' (transformers), '' (the model itself)."""
    if isinstance(getattr(root, "visual", None), torch.nn.Module):
        return "visual"
    clip = getattr(root, "clip", None)
    if isinstance(getattr(clip, "vision_model", None), torch.nn.Module):
        return "clip.vision_model"
    return ""


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _relative(full: str, prefix: str) -> str:
    """`full`'s name inside the image tower ('' for the tower itself or a module outside it)."""
    if not prefix:
        return full
    return full[len(prefix) + 1 :] if full.startswith(prefix + ".") else ""


def _private_view(root: torch.nn.Module, names: Sequence[str] | None) -> tuple[torch.nn.Module, dict[str, torch.nn.Module]]:
    """A view of `root` that shares every parameter, buffer and untouched module, but owns copies of the
    modules named in `names` and of their ancestors (every module when `names` is None), each copy with
    its own child table and hook tables. Hooks on a copy fire only for forward passes through the view.

    Returns the view's root and {dotted name: copy} ('' is the root). Costs one shallow object copy
    per copied module: a handful for one target layer."""
    copies: dict[str, torch.nn.Module] = {}

    def wanted(path: str) -> bool:
        return names is None or any(n == path or n.startswith(path + ".") for n in names)

    def copy_module(mod: torch.nn.Module, path: str) -> torch.nn.Module:
        dup = mod.__class__.__new__(mod.__class__)
        dup.__dict__.update(mod.__dict__)
        for table in _HOOK_TABLES:
            if table in mod.__dict__:
                dup.__dict__[table] = OrderedDict(mod.__dict__[table])  # existing hooks kept, new ones private
        children = OrderedDict(mod._modules)
        for key, child in mod._modules.items():
            sub = _join(path, key)
            if child is not None and wanted(sub):
                children[key] = copy_module(child, sub)
        dup.__dict__["_modules"] = children
        copies[path] = dup
        return dup

    view = copy_module(root, "")
    missing = [n for n in (names or ()) if n not in copies]
    if missing:
        raise KeyError(f"no module named {missing[0]!r} in {type(root).__name__}")
    return view, copies


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
