"""Service settings: limits and options, from `PIGEON_*` environment variables or keyword arguments.

`Settings` is a pydantic-settings model, so every field reads the environment variable named
`PIGEON_<FIELD>` (`PIGEON_MAX_CONCURRENCY=4`); keyword arguments win over the environment, and an
environment variable that is set but empty counts as unset (docker compose's `${VAR:-}`), except
`PIGEON_API_KEY`: an empty key is refused, since reading it as "no key" would silently turn auth
off (docker/compose.yaml passes the variable only when it is set). Values
are checked when the object is made, i.e. at start-up: a bad one raises `UserError` with one line
naming the setting, its environment variable and the allowed range, so `pigeon serve` exits 2
before anything listens.
"""

from __future__ import annotations

import math
import os
from typing import Annotated, Any, Optional

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from pigeon.core.errors import FieldError, UserError
from pigeon.index import RefineConfig
from pigeon.backbones.precision import CHOICES, check_precision_name
from pigeon.index.refine import MODES

ENV_PREFIX = "PIGEON_"
SETTING_OF_FIELD = {"mode": "refine"}   # RefineConfig's field -> the setting (and `pigeon serve` flag) that sets it
_OFF = ("inf", "infinity", "none", "off")

# What a field accepts, for fields whose type and bounds do not say it (see `_allowed`).
_ALLOWED = {
    "api_key": "a non-empty key of printable ASCII without leading/trailing spaces (it travels in the X-API-Key header); unset it to turn auth off",
    "cors_origins": "comma-separated origins such as https://example.org",
    "warmup": "true or false",
    "refine": f"one of {', '.join(MODES)}",
    "max_refinement_km": "a distance in km > 0, or inf/none/off for no guard",
    "precision": f"one of {', '.join(CHOICES)}",
    "batch_wait_ms": "a number of ms >= 0 and <= 1000 (0: a batch never waits)",
}


class Settings(BaseSettings):
    """Service limits and options; each field also reads `PIGEON_<FIELD>` (see docs/serve.md)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="forbid")

    max_upload_bytes: int = Field(20 * 1024 * 1024, gt=0, description="whole request body; 413 beyond")
    max_pixels: int = Field(50_000_000, gt=0, description="width x height from the header, before decoding; 413 beyond")
    max_request_pixels: int = Field(200_000_000, gt=0, description="sum of width x height over a request's images, from the headers, before decoding; 413 beyond")
    min_side: int = Field(16, ge=1, description="smaller images are refused (422): nothing to locate in a 1x1 image")
    max_batch: int = Field(16, ge=1, description="images per /locate/batch request")
    max_top_k: int = Field(50, ge=1, description="largest top_k a request may ask for")
    max_concurrency: int = Field(1, ge=1, description="inferences at once (torch already uses every core for one)")
    max_queue: int = Field(8, ge=0, description="requests allowed to wait; more -> 503 + Retry-After")
    retry_after_s: int = Field(1, ge=0, description="the Retry-After value on 503")
    body_timeout_s: float = Field(30.0, gt=0, description="seconds from admission within which the whole request body must arrive; 408 beyond (a stalled or trickling client cannot hold a slot)")
    min_upload_bytes_per_s: float = Field(16 * 1024, ge=0, description="after the first 5 s, an upload slower than this on average is cut off (408); 0: no minimum")
    max_held_refusals: int = Field(256, ge=0, description="503s held until their Retry-After has passed (cheap idle waits); beyond this, answered at once with Connection: close")
    graceful_shutdown_s: float = Field(5.0, ge=0, description="on SIGTERM, seconds to let requests in flight finish before they are cancelled")
    api_key: Optional[str] = Field(None, repr=False, description="when set, X-API-Key is required except on the page, docs, /health and /static")
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list, description="origins allowed to call from a browser")
    cells_simplify: float = Field(0.05, ge=0, description="degrees, for GET /cells")
    warmup: bool = Field(True, description="one inference at start-up, so the first request is not the slow one")
    refine: Optional[str] = Field(None, description="gallery refinement mode: cluster+nn, cluster, nn, none; unset: the mode the bundle recorded, else cluster+nn")
    max_refinement_km: Optional[float] = Field(None, description="PIGEON's guard (default 1000 km; inf/none/off turns it off)")
    device: Optional[str] = Field(None, description="torch device of the model: cpu, cuda, cuda:N; unset/auto: cuda when there is one, else cpu")
    precision: Optional[str] = Field(None, description="backbone forwards: auto, fp32, bf16, fp16; unset/auto: bf16 on CUDA (fp16 without bf16), fp32 on CPU; fp16 is refused on CPU")
    max_batch_images: int = Field(16, ge=1, description="images per backbone forward when concurrent locate requests are batched together (a request with more goes alone)")
    batch_wait_ms: float = Field(2.0, ge=0, le=1000, description="ms a batch may wait, after its first request arrived, for requests still decoding (never when none is); 0: never waits")

    def __init__(self, **values: Any) -> None:
        """Read and check the settings; anything out of range raises `UserError` (one line)."""
        if values.get("api_key") is None and os.environ.get(f"{ENV_PREFIX}API_KEY") == "":
            raise UserError(f"{ENV_PREFIX}API_KEY is set but empty: unset it for no auth, or give a key")
        try:
            super().__init__(**values)
        except ValidationError as e:
            raise UserError(_one_line(e)) from None
        try:
            self.refine_config()  # the refinement options are checked here too, named as the user set them
        except FieldError as e:
            name = SETTING_OF_FIELD.get(e.field, e.field)
            raise e.renamed(f"--{name.replace('_', '-')}", f"{ENV_PREFIX}{name.upper()}") from None

    @classmethod
    def from_env(cls, **overrides: Any) -> "Settings":
        """Defaults, then PIGEON_<FIELD> environment variables, then explicit `overrides` (None ignored)."""
        return cls(**{k: v for k, v in overrides.items() if v is not None})

    def refine_config(self) -> RefineConfig:
        """The refinement options these settings give (None fields: the bundle's / PIGEON's defaults)."""
        return RefineConfig.from_options(self.refine, self.max_refinement_km)

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, v: Any) -> Any:
        """`PIGEON_CORS_ORIGINS=a,b` -> ["a", "b"]; a list passes as given."""
        return [o.strip() for o in v.split(",") if o.strip()] if isinstance(v, str) else v

    @field_validator("max_refinement_km", mode="before")
    @classmethod
    def _guard_off(cls, v: Any) -> Any:
        """inf / none / off (any case) -> no guard (math.inf)."""
        return math.inf if isinstance(v, str) and v.strip().lower() in _OFF else v

    @field_validator("device")
    @classmethod
    def _device_name(cls, v: Optional[str]) -> Optional[str]:
        """auto or a torch device name (whether this machine has it is checked when the bundle loads)."""
        if v is None or v.strip().lower() in ("", "auto"):
            return None
        return v.strip()

    @field_validator("precision")
    @classmethod
    def _precision_name(cls, v: Optional[str]) -> Optional[str]:
        """auto / fp32 / bf16 / fp16, any case (whether the device runs it is checked when the bundle loads)."""
        if v is None:
            return v
        try:
            return check_precision_name(v)
        except UserError:
            raise ValueError("unknown precision") from None

    @field_validator("api_key")
    @classmethod
    def _usable_key(cls, v: Optional[str]) -> Optional[str]:
        """An empty or blank key would silently turn auth off; spaces or control characters would lock everyone out."""
        if v is not None and (not v.strip() or v != v.strip() or not all(" " <= ch <= "~" for ch in v)):
            raise ValueError("unusable API key")
        return v


def _allowed(name: str) -> str:
    """What field `name` accepts, in words: from `_ALLOWED`, else from its type and bounds."""
    if name in _ALLOWED:
        return _ALLOWED[name]
    f = Settings.model_fields[name]
    kind = {int: "an integer", float: "a number"}.get(f.annotation, "a value")
    bounds = [f"{op} {getattr(m, attr)}" for m in f.metadata for attr, op in (("ge", ">="), ("gt", ">")) if getattr(m, attr, None) is not None]
    return " ".join([kind, *bounds])


def _one_line(e: ValidationError) -> str:
    """One line for all of a ValidationError's problems: setting, env variable, value given, what is allowed."""
    parts = []
    for err in e.errors(include_url=False):
        name = str(err["loc"][0]) if err["loc"] else "settings"
        if name not in Settings.model_fields:
            parts.append(f"unknown setting {name}; the settings are {', '.join(Settings.model_fields)}")
            continue
        given = "" if name == "api_key" else f" = {err.get('input')!r}"  # never echo a key
        parts.append(f"setting {name} (env {ENV_PREFIX}{name.upper()}){given}: give {_allowed(name)}")
    return "; ".join(parts)
