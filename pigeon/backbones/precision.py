"""The numeric precision of the image tower's inference forwards: the one owner of `--precision`.

`resolve_precision(requested, device)` turns what the user asked for (`auto`, `fp32`, `bf16`, `fp16`,
or None = auto) into what runs on that device, or refuses it in one line:

| device                   | auto  | fp32 | bf16                     | fp16    |
|--------------------------|-------|------|--------------------------|---------|
| CUDA with bf16 (Ampere+) | bf16  | fp32 | bf16                     | fp16    |
| CUDA without bf16        | fp16  | fp32 | refused (use fp16)       | fp16    |
| CPU                      | fp32  | fp32 | bf16 (slow without AMX)  | refused |
| MPS                      | fp32  | fp32 | refused                  | refused |

bf16 and fp16 are torch autocast (`autocast(precision, device)`): the weights stay float32 and the
matmuls/convolutions run in the lower precision; the embeddings come back float32 (then normalised).
fp16 on CPU is refused rather than quietly run in fp32, so a figure labelled fp16 is one. On CUDA
TF32 matmuls are allowed (`allow_tf32`), including under fp32.

The precision applies to the image tower's inference (embedding data sources, locate, serve,
evaluate); text embeddings (zero-shot / text-initialised prototypes), training forwards with
gradients (`--unfreeze-last-block`, pretrain's own AMP) and explain's gradient maps keep their own.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

from ..core.errors import FieldError

PRECISIONS = ("fp32", "bf16", "fp16")
CHOICES = ("auto", *PRECISIONS)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision_name(requested: str | None) -> str:
    """The requested precision, lower-cased (None -> "auto"); a one-line `FieldError` for an unknown name
    (field `precision`: the CLI names it `--precision`, the service `PIGEON_PRECISION` too)."""
    req = "auto" if requested is None else str(requested).strip().lower()
    if req not in CHOICES:
        raise FieldError("precision", repr(requested), f"give one of {', '.join(CHOICES)} (auto: bf16 on CUDA, fp32 on CPU)")
    return req


def _cuda_bf16(dev: torch.device) -> bool:
    """Whether GPU `dev` computes bfloat16 natively (compute capability 8.0+, Ampere on; ROCm: torch's
    answer). Not `is_bf16_supported()` alone, which also says yes to the slow emulation on older GPUs."""
    try:
        if torch.version.hip:
            return bool(torch.cuda.is_bf16_supported())
        return torch.cuda.get_device_capability(dev)[0] >= 8
    except Exception:  # no driver, or an old build: say no rather than fail
        return False


def resolve_precision(requested: str | None, device: str | torch.device) -> str:
    """What runs on `device` for `requested` (auto/None, fp32, bf16, fp16): "fp32", "bf16" or "fp16" (table
    above); a `FieldError` (field `precision`) when the device cannot run it."""
    req = check_precision_name(requested)
    dev = torch.device(device)
    if dev.type == "cuda":
        bf16 = _cuda_bf16(dev)
        if req == "auto":
            return "bf16" if bf16 else "fp16"
        if req == "bf16" and not bf16:
            raise FieldError("precision", req, "this GPU has no bfloat16 support; use fp16 (or auto, which picks it) or fp32")
        return req
    if req in ("auto", "fp32"):
        return "fp32"
    if dev.type == "cpu":
        if req == "fp16":
            raise FieldError("precision", req, "needs a CUDA device (CPU autocast has no fast float16); on CPU use fp32 (the default) or bf16")
        return req
    raise FieldError("precision", req, f"mixed precision runs on CUDA (bf16 also on CPU), not on {dev.type}; use fp32 there")


def autocast(precision: str, device: str | torch.device) -> ContextManager:
    """torch autocast to `precision`'s dtype on `device`'s type; a no-op context for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=DTYPES[precision])


def allow_tf32(device: str | torch.device) -> None:
    """On CUDA, let float32 matmuls and convolutions use TF32 tensor cores (process-wide; no-op elsewhere).
    The CUDA flags, not `torch.set_float32_matmul_precision("high")`, which would also reach oneDNN's CPU matmuls."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


__all__ = ["PRECISIONS", "CHOICES", "check_precision_name", "resolve_precision", "autocast", "allow_tf32"]
