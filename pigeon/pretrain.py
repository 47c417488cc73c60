"""Contrastive pretraining of a backbone on photos and synthetic captions, as PIGEON fine-tunes CLIP.

Symmetric InfoNCE between images and their captions (open_clip's `ClipLoss`), a freeze policy (the
last N blocks of each tower, the heads/projections and the logit scale train), AdamW with linear
warm-up and cosine decay, gradient accumulation, mixed precision on CUDA, checkpoints with
`resume`, and the result written as `backbone.safetensors` into a bundle.

It runs unchanged under `torchrun --nproc_per_node=N` (DistributedDataParallel; gloo on CPU, nccl
on GPU). `batch_size` is the global contrastive batch: each of N processes takes batch_size/N
samples of the same global order and features are all-gathered (with gradients) before the loss,
so N processes follow the single-process trajectory.

`data` is a manifest (read whole, a seeded global order each epoch, exact step resume) or a
WebDataset / image-Parquet source, streamed shard by shard (`pigeon.datasets.stream`: a seeded shard
order each epoch, ranks and loader workers splitting the shards, a shuffle buffer; resume restarts
the epoch at its first unfinished shard).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from open_clip.loss import ClipLoss
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP

from pigeon.core.io import atomic_path
from pigeon.core.progress import ProgressBar, progress as progress_bar
from pigeon.geocells import GeoCells

from .backbones import Backbone, create_backbone, parse_spec
from .bundle import Bundle
from .captions import CaptionMaker
from .core.errors import UserError
from .core.splits import TRAIN, select as select_splits
from .distributed import Dist as _Dist
from .distributed import all_ok
from .distributed import barrier as _barrier
from .distributed import setup_distributed as _setup_distributed
from .distributed import teardown as _teardown
from .datasets import EpochSampler, ImageDataset, build_train_transform, load_image, rare_cell_weights, read_manifest
from .datasets.sources import Source, detect_kind, open_source
from .datasets.stream import ShardStream, StreamBatch

CHECKPOINT_DIR = "pretrain"


@dataclass
class PretrainConfig:
    """Hyper-parameters. `batch_size` is global (all processes together), per micro-step; an optimizer
    step sees batch_size * accum samples. `unfreeze_last` -1 trains everything."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 1e-5
    weight_decay: float = 0.1
    warmup: float = 0.05  # fraction of the optimizer steps (< 1) or a number of steps (>= 1)
    accum: int = 1
    unfreeze_last: int = 2
    seed: int = 0
    max_steps: int | None = None  # stop after this many optimizer steps (the schedule still spans all epochs)
    oversample: float = 0.0  # rare-cell oversampling power (0: off; 0.5: weight ∝ count^-0.5)
    augment: bool = True
    hflip: float = 0.0  # flips mirror the driving side that captions state; off by default
    num_workers: int = 0
    checkpoint_every: int = 50  # optimizer steps
    amp: bool | None = None  # None: on where CUDA is
    strict: bool = False
    split: str = TRAIN
    samples_per_epoch: int | None = None  # streamed sources: epoch length for the schedule (None: count the source once)
    shuffle_buffer: int = 2000  # streamed sources: samples per loader worker's shuffle buffer


@dataclass
class PretrainResult:
    losses: list[float]  # per optimizer step (mean over its micro-steps; the global-batch loss)
    steps: int
    images: int  # images this run processed (all processes)
    seconds: float
    images_per_s: float
    backbone_hash: str | None
    bundle: str
    skipped: list[str] = field(default_factory=list)
    skipped_counts: dict[str, int] = field(default_factory=dict)  # reason -> samples skipped


# ---------------------------------------------------------------------------------------------
# schedule, optimizer


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1 over `warmup` steps, then cosine decay to 0 at `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay on gains, biases, norms, embeddings' scales and the logit scale (as open_clip)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "bn" in name or "ln" in name or "norm" in name or "bias" in name or "logit_scale" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def _freeze_batchnorm(model: torch.nn.Module) -> None:
    """BatchNorm layers stay in eval mode: small contrastive batches give noisy statistics, and
    per-process statistics would make N processes differ from one."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


# ---------------------------------------------------------------------------------------------
# the run's parts


@dataclass
class _Data:
    """The training rows and their caption facts: what every epoch draws images and captions from.
    A streamed source has no rows in memory (`df`, `facts` None): batches bring their caption fields."""

    df: pd.DataFrame | None
    skipped: list[str]  # rows left out because their image would not open
    geocells: GeoCells
    maker: CaptionMaker
    facts: pd.DataFrame | None
    n: int = 0  # training samples: the manifest's readable rows, or the streamed source's count
    source: Source | None = None  # a WebDataset / image-Parquet source, streamed
    skip_counts: Counter = field(default_factory=Counter)  # streamed: reason -> samples skipped


@dataclass
class _Plan:
    """How the rows are walked: dataset, sampler and the step counts the schedule spans."""

    ds: ImageDataset | None  # manifest only (a stream builds its dataset per epoch)
    sampler: EpochSampler | None
    local_bs: int  # per process, per micro-step
    step_samples: int  # global samples per optimizer step
    steps_per_epoch: int
    total_steps: int
    stop: int  # last optimizer step of this run (max_steps or the schedule's end)
    transform: Callable | None = None


@dataclass
class _Trainer:
    """The model and what steps it; `train_model` is the DDP wrapper under torchrun, else `model`."""

    bb: Backbone
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    amp: bool
    amp_dtype: torch.dtype
    train_model: torch.nn.Module | None = None
    loss_fn: ClipLoss | None = None

    @property
    def model(self) -> torch.nn.Module:
        return self.bb.model


@dataclass
class _Progress:
    """Where the run stands: optimizer steps done (resumed ones included), their losses, images seen here."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    images: int = 0
    epoch: int = 0  # streamed sources: the epoch under way,
    shards_done: int = 0  # how many of its shards (in its order) are finished,
    epoch_step0: int = 0  # and the step it began at


_RESUME_KEYS = ("batch_size", "accum", "epochs", "seed", "unfreeze_last", "lr", "warmup", "oversample", "augment", "hflip", "split",
                "samples_per_epoch")


def _checkpoint_path(out: Path) -> Path:
    """Where `--resume` looks: inside the bundle, next to the loss log."""
    return Path(out) / CHECKPOINT_DIR / "checkpoint.pt"


# ---------------------------------------------------------------------------------------------
# set-up: options, data, model, optimiser


def _check_options(cfg: PretrainConfig, backbone: str) -> None:
    """Refuse a bad backbone spec or batch shape before any data is read or process group joined."""
    parse_spec(backbone)
    warnings.filterwarnings("ignore", message=".*all_gather is deprecated.*", category=FutureWarning)
    if cfg.batch_size < 2:
        raise UserError(f"--batch-size {cfg.batch_size}: contrastive training needs at least 2 images per batch")
    if cfg.accum < 1 or cfg.epochs < 1:
        raise UserError("--accum and --epochs must be at least 1")


def _local_batch_size(cfg: PretrainConfig, d: _Dist) -> int:
    """The batch each process takes: `batch_size` is global, so it must split evenly over the processes."""
    if cfg.batch_size % d.world:
        raise UserError(f"--batch-size {cfg.batch_size} is global; it must be a multiple of the {d.world} processes")
    return cfg.batch_size // d.world


def _usable_rows(df: pd.DataFrame, strict: bool) -> tuple[np.ndarray, list[str]]:
    """Rows whose image header opens (cheap: no decoding); the others are skipped and named, or refused when strict."""
    ok = np.zeros(len(df), dtype=bool)
    bad: list[str] = []
    for i, p in enumerate(df["path"].to_numpy()):
        try:
            with Image.open(p) as im:
                im.size  # noqa: B018 - reading the header is the check
            ok[i] = True
        except Exception as e:
            if strict:
                raise UserError(f"image {p} is unreadable ({type(e).__name__}); fix or drop it, or leave out --strict to skip it") from e
            bad.append(str(p))
    return ok, bad


def _training_rows(data: str | os.PathLike, cfg: PretrainConfig) -> tuple[pd.DataFrame, list[str]]:
    """The manifest's rows of `cfg.split` whose images open; enough of them for one optimizer step."""
    df = read_manifest(data, strict=cfg.strict)
    df = df[select_splits(df["split"], cfg.split or None, f"manifest {data}", flag="--split")].reset_index(drop=True)
    ok, skipped = _usable_rows(df, cfg.strict)
    df = df[ok].reset_index(drop=True)
    if len(df) < cfg.batch_size * cfg.accum:
        raise UserError(f"manifest {data} has {len(df)} readable training images, fewer than one optimizer step needs (batch size {cfg.batch_size} x accum {cfg.accum}); lower --batch-size")
    return df, skipped


def _streamed(data: str | os.PathLike) -> bool:
    """Whether `data` is a WebDataset or image-Parquet source (streamed by shard) rather than a manifest,
    which is read as it always was (a missing .csv or plain path goes to read_manifest and its message)."""
    s = str(data)
    if Path(s).suffix.lower() in (".csv", ".tsv", ".txt") or (not Path(s).exists() and not re.search(r"[{*?\[]|^[A-Za-z][\w+.-]+:", s)):
        return False
    return detect_kind(data) != "manifest"


def _stream_source(data: str | os.PathLike, cfg: PretrainConfig, d: _Dist) -> tuple[Source, int]:
    """The streamed source and its training samples per epoch: `samples_per_epoch`, else counted once
    (coordinates only: a Parquet file's coordinate columns, a tar's .json members)."""
    if cfg.oversample > 0:
        raise UserError(f"--oversample draws samples by index; {data} is streamed shard by shard: give a manifest or leave out --oversample")
    src = open_source(data, strict=cfg.strict)
    if len(src.shards) < d.world:
        raise UserError(f"data source {data} has {len(src.shards)} shard(s) for {d.world} processes; each process needs at least one: cut it into more shards")
    if cfg.samples_per_epoch is not None:
        if cfg.samples_per_epoch < 1:
            raise UserError(f"--samples-per-epoch {cfg.samples_per_epoch}: give a positive number of samples")
        return src, int(cfg.samples_per_epoch)
    n = int(select_splits(src.coords()["split"], cfg.split or None, f"data source {data}", flag="--split").sum())
    return src, n


def _load_data(data: str | os.PathLike, cells: str | os.PathLike | GeoCells, cfg: PretrainConfig, d: _Dist) -> _Data:
    """Training rows plus the geographic facts their captions are composed from (once; wording varies per
    epoch); for a streamed source only the sample count (each batch brings its caption fields)."""
    geocells = cells if isinstance(cells, GeoCells) else GeoCells.load(cells)
    maker = CaptionMaker(geocells, seed=cfg.seed)
    if _streamed(data):
        src, n = _stream_source(data, cfg, d)
        if n < cfg.batch_size * cfg.accum:
            raise UserError(f"data source {data} has {n} training samples, fewer than one optimizer step needs (batch size {cfg.batch_size} x accum {cfg.accum}); lower --batch-size")
        return _Data(df=None, skipped=[], geocells=geocells, maker=maker, facts=None, n=n, source=src)
    df, skipped = _training_rows(data, cfg)
    facts = maker.facts(df["lat"].to_numpy(), df["lon"].to_numpy(), df["taken_at"], df["heading"].to_numpy())
    return _Data(df=df, skipped=skipped, geocells=geocells, maker=maker, facts=facts, n=len(df))


def _load_backbone(backbone: str, cfg: PretrainConfig, d: _Dist) -> Backbone:
    """The backbone on this process's device with the freeze policy applied; refuse one with nothing to train."""
    bb = create_backbone(backbone, device=d.device)
    if bb.set_trainable(cfg.unfreeze_last) == 0:
        raise UserError(f"backbone {backbone}: nothing to train with --unfreeze-last {cfg.unfreeze_last}")
    return bb


def _plan(bb: Backbone, data: _Data, cfg: PretrainConfig, d: _Dist, local_bs: int) -> _Plan:
    """Dataset (augmented or plain), the shared global sample order, and the step counts of the schedule."""
    transform = build_train_transform(bb.image_size, bb.mean, bb.std, hflip=cfg.hflip) if cfg.augment else bb.preprocess
    if data.source is not None:
        return _stream_plan(transform, data, cfg, local_bs)
    ds = ImageDataset(data.df, transform, strict=cfg.strict, seed=cfg.seed)
    weights = rare_cell_weights(data.facts["cell"].to_numpy(), cfg.oversample) if cfg.oversample > 0 else None
    step_samples = cfg.batch_size * cfg.accum
    sampler = EpochSampler(len(data.df), seed=cfg.seed, weights=weights, rank=d.rank, world_size=d.world, drop_last_multiple=step_samples)
    steps_per_epoch = len(sampler.global_order()) // step_samples
    total_steps = steps_per_epoch * cfg.epochs
    stop = total_steps if cfg.max_steps is None else min(total_steps, cfg.max_steps)
    return _Plan(ds=ds, sampler=sampler, local_bs=local_bs, step_samples=step_samples, steps_per_epoch=steps_per_epoch,
                 total_steps=total_steps, stop=stop)


def _stream_plan(transform: Callable, data: _Data, cfg: PretrainConfig, local_bs: int) -> _Plan:
    """A streamed source's step counts: the schedule spans `data.n` samples per epoch; an epoch ends
    there, or earlier when a rank runs out of samples."""
    step_samples = cfg.batch_size * cfg.accum
    steps_per_epoch = data.n // step_samples
    total_steps = steps_per_epoch * cfg.epochs
    stop = total_steps if cfg.max_steps is None else min(total_steps, cfg.max_steps)
    return _Plan(ds=None, sampler=None, local_bs=local_bs, step_samples=step_samples, steps_per_epoch=steps_per_epoch,
                 total_steps=total_steps, stop=stop, transform=transform)


def _optimiser(bb: Backbone, cfg: PretrainConfig, d: _Dist, total_steps: int) -> _Trainer:
    """AdamW with warm-up and cosine decay over all epochs; bf16 (or fp16 with loss scaling) autocast on CUDA."""
    warmup = int(cfg.warmup if cfg.warmup >= 1 else round(cfg.warmup * total_steps))
    opt = torch.optim.AdamW(_param_groups(bb.model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, warmup))
    cuda = d.device.startswith("cuda")
    amp = cuda if cfg.amp is None else (cfg.amp and cuda)
    amp_dtype = torch.bfloat16 if (cuda and torch.cuda.is_bf16_supported()) else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp and amp_dtype == torch.float16)
    return _Trainer(bb=bb, opt=opt, sched=sched, scaler=scaler, amp=amp, amp_dtype=amp_dtype)


def _wrap_for_training(tr: _Trainer, d: _Dist) -> None:
    """DDP under torchrun (after any resume, so every process starts from the loaded weights) and the
    global-batch loss: features are all-gathered with gradients, so N processes follow one."""
    tr.train_model = tr.model
    if d.world > 1:
        cuda = d.device.startswith("cuda")
        tr.train_model = DDP(tr.model, device_ids=[d.local_rank] if cuda else None, broadcast_buffers=False)
    tr.loss_fn = ClipLoss(local_loss=False, gather_with_grad=True, rank=d.rank, world_size=d.world)


# ---------------------------------------------------------------------------------------------
# checkpoints


def _check_checkpoint(state: dict[str, Any], ckpt: Path, bb: Backbone, cfg: PretrainConfig, data: _Data) -> None:
    """Refuse to resume a checkpoint of another backbone, other options or other data, naming what differs."""
    if state["spec"] != bb.spec:
        raise UserError(f"--resume: the checkpoint {ckpt} trains {state['spec']!r}, not {bb.spec!r}; give the same --backbone or start afresh")
    diff = [k for k in _RESUME_KEYS if state["config"].get(k) != asdict(cfg).get(k)]
    if diff:
        raise UserError(f"--resume: options {', '.join(diff)} differ from the checkpoint's ({', '.join(k + '=' + repr(state['config'].get(k)) for k in diff)}); use the same options or start afresh")
    if (state.get("stream") is None) != (data.source is None):
        kinds = ("a manifest", "a streamed source (WebDataset/Parquet)")
        raise UserError(f"--resume: the checkpoint {ckpt} was trained on {kinds[state.get('stream') is not None]}, --data is {kinds[data.source is not None]}; use the same data or start afresh")
    if state["n_rows"] != data.n:
        raise UserError(f"--resume: the checkpoint was trained on {state['n_rows']} images, the {'source' if data.source else 'manifest'} now has {data.n}; use the same data or start afresh")
    if data.source is not None and state["stream"]["shards"] != data.source.shards:
        raise UserError(f"--resume: the checkpoint's {len(state['stream']['shards'])} shards are not the {len(data.source.shards)} of {data.source.spec}; use the same shards or start afresh")


def _resume(ckpt: Path, tr: _Trainer, cfg: PretrainConfig, data: _Data) -> _Progress:
    """Load model, optimiser, schedule and scaler from the checkpoint so the run continues exactly (a
    streamed source: at the first unfinished shard of the epoch under way)."""
    if not ckpt.exists():
        raise UserError(f"--resume: no checkpoint at {ckpt}; start without --resume")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    _check_checkpoint(state, ckpt, tr.bb, cfg, data)
    tr.model.load_state_dict(state["model"])
    tr.opt.load_state_dict(state["optimizer"])
    tr.sched.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        tr.scaler.load_state_dict(state["scaler"])
    st = state.get("stream") or {}
    return _Progress(step=int(state["step"]), losses=list(state["losses"]), epoch=int(st.get("epoch", 0)),
                     shards_done=int(st.get("shards_done", 0)), epoch_step0=int(st.get("epoch_step0", 0)))


def _save_checkpoint(ckpt: Path, tr: _Trainer, cfg: PretrainConfig, data: _Data, prog: _Progress, d: _Dist) -> None:
    """Write everything `--resume` needs (main process only, atomically: a killed run leaves the last good one)."""
    if not d.main:
        return
    state = {
        "spec": tr.bb.spec,
        "config": asdict(cfg),
        "n_rows": data.n,
        "step": prog.step,
        "losses": prog.losses,
        "model": tr.model.state_dict(),
        "optimizer": tr.opt.state_dict(),
        "scheduler": tr.sched.state_dict(),
        "scaler": tr.scaler.state_dict() if tr.scaler.is_enabled() else None,
    }
    if data.source is not None:
        state["stream"] = {"epoch": prog.epoch, "shards_done": prog.shards_done, "epoch_step0": prog.epoch_step0,
                           "shards": data.source.shards}
    with atomic_path(ckpt) as tmp:
        torch.save(state, tmp)


# ---------------------------------------------------------------------------------------------
# the loop


def _micro_step(tr: _Trainer, x: torch.Tensor, texts: list[str], cfg: PretrainConfig, d: _Dist, sync: bool) -> float:
    """Forward and backward of one micro-batch (gradients synchronised across processes only when `sync`)."""
    tokens = tr.bb.tokenize(texts)
    x, tokens = x.to(d.device, non_blocking=True), tokens.to(d.device, non_blocking=True)
    ctx = tr.train_model.no_sync() if (d.world > 1 and not sync) else contextlib.nullcontext()
    with ctx:
        with torch.autocast("cuda", dtype=tr.amp_dtype, enabled=tr.amp):
            out_ = tr.train_model(image=x, text=tokens)
            img_f, txt_f, scale = (out_["image_features"], out_["text_features"], out_["logit_scale"]) if isinstance(out_, dict) else out_[:3]
            loss = tr.loss_fn(img_f.float(), txt_f.float(), scale.float())
        tr.scaler.scale(loss / cfg.accum).backward()
    return float(loss.detach())


def _next_batch(it: Iterator, d: _Dist, stream: bool) -> tuple[torch.Tensor, list[str]] | None:
    """The next (images, captions); None when a streamed epoch is over for some process, so that all end it together."""
    if not stream:
        batch = next(it)
        if batch is None:
            raise UserError("a whole batch of images was unreadable; check the manifest's files")
        return batch
    batch = next(it, None)
    return batch if all_ok(d, batch is not None) else None


def _optimizer_step(tr: _Trainer, it: Iterator, cfg: PretrainConfig, d: _Dist, prog: _Progress, stream: bool = False) -> float | None:
    """One optimizer step over `accum` micro-batches; returns its loss (the mean over the micro-batches),
    or None when a streamed epoch ran out first (the partial accumulation is dropped)."""
    tr.opt.zero_grad(set_to_none=True)
    step_loss = 0.0
    for micro in range(cfg.accum):
        batch = _next_batch(it, d, stream)
        if batch is None:
            return None
        sync = micro == cfg.accum - 1 or d.world == 1
        step_loss += _micro_step(tr, batch[0], batch[1], cfg, d, sync) / cfg.accum
        prog.images += len(batch[1]) * d.world
    tr.scaler.step(tr.opt)
    tr.scaler.update()
    tr.sched.step()
    with torch.no_grad():
        ls = getattr(tr.model, "logit_scale", None)
        if isinstance(ls, torch.nn.Parameter):
            ls.clamp_(0, math.log(100))
    return step_loss


def _record_step(tr: _Trainer, prog: _Progress, step_loss: float, pbar: ProgressBar | None) -> None:
    """Count a finished optimizer step, keep its loss, move the progress bar."""
    prog.step += 1
    prog.losses.append(step_loss)
    if pbar is not None:
        pbar.update(1)
        pbar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{tr.sched.get_last_lr()[-1]:.2e}")


def _checkpoint_due(cfg: PretrainConfig, plan: _Plan, prog: _Progress) -> bool:
    return bool(cfg.checkpoint_every) and prog.step % cfg.checkpoint_every == 0 and prog.step < plan.stop


def _run_epoch(tr: _Trainer, plan: _Plan, data: _Data, cfg: PretrainConfig, d: _Dist, prog: _Progress,
               pbar: ProgressBar | None, ckpt: Path) -> None:
    """Train from `prog.step` to the end of its epoch (or `plan.stop`): this epoch's order, augmentations and
    caption wording, a checkpoint every `checkpoint_every` steps. The loader ends with the call."""
    epoch, in_epoch = divmod(prog.step, plan.steps_per_epoch)
    plan.sampler.set_epoch(epoch, skip=in_epoch * plan.step_samples)
    plan.ds.set_epoch(epoch)
    captions = data.maker.compose(data.facts, np.random.default_rng([cfg.seed, epoch]))
    loader = torch.utils.data.DataLoader(
        plan.ds, batch_size=plan.local_bs, sampler=plan.sampler, collate_fn=ImageDataset.collate, num_workers=cfg.num_workers,
        drop_last=True, persistent_workers=False, pin_memory=d.device.startswith("cuda"),
    )
    it = (None if b is None else (b[0], [captions[i] for i in b[1].tolist()]) for b in loader)
    while prog.step < plan.stop and prog.step // plan.steps_per_epoch == epoch:
        _record_step(tr, prog, _optimizer_step(tr, it, cfg, d, prog), pbar)
        if _checkpoint_due(cfg, plan, prog):
            _save_checkpoint(ckpt, tr, cfg, data, prog, d)


class _StreamFeed:
    """A streamed epoch's training batches as (images, captions). Worker reports and batches update which
    of the epoch's shards are finished (drained and trained on) and the skip counts as they pass."""

    def __init__(self, loader: torch.utils.data.DataLoader, data: _Data, cfg: PretrainConfig, d: _Dist, epoch: int, start: int):
        self.it, self.data, self.seed, self.rank, self.epoch = iter(loader), data, cfg.seed, d.rank, epoch
        self.finished = np.zeros(len(data.source.shards), dtype=bool)
        self.finished[:start] = True
        self.batches = 0

    def __iter__(self) -> "_StreamFeed":
        return self

    def __next__(self) -> tuple[torch.Tensor, list[str]]:
        for b in self.it:
            self._note(b)
            if b.images is not None:
                return b.images, self._captions(b)
        raise StopIteration

    def _note(self, b: StreamBatch) -> None:
        """Mark the batch's drained shards finished (its samples are trained on before any checkpoint) and count its skips."""
        self.finished[b.drained] = True
        self.data.skip_counts.update(b.skipped)
        self.data.skipped += b.bad
        if b.error:
            raise UserError(b.error)

    def _captions(self, b: StreamBatch) -> list[str]:
        """Captions from the batch's own fields; the wording seeded by (seed, epoch, rank, batch)."""
        facts = self.data.maker.facts(b.lat, b.lon, b.taken_at, b.heading)
        self.batches += 1
        return self.data.maker.compose(facts, np.random.default_rng([self.seed, self.epoch, self.rank, self.batches]))

    def shards_done(self, d: _Dist) -> int:
        """How many of the epoch's shards, in its order, are finished on every process (a collective)."""
        done = torch.from_numpy(self.finished.astype(np.int64)).to(d.device)
        if d.world > 1:
            dist.all_reduce(done, op=dist.ReduceOp.MAX)   # each shard is one process's
        unfinished = np.flatnonzero(done.cpu().numpy() == 0)
        return int(unfinished[0]) if len(unfinished) else len(self.finished)


def _run_stream_epoch(tr: _Trainer, plan: _Plan, data: _Data, cfg: PretrainConfig, d: _Dist, prog: _Progress,
                      pbar: ProgressBar | None, ckpt: Path) -> None:
    """Train on `prog.epoch`'s shards from `prog.shards_done` on, until a process runs out of samples, the
    epoch's share of the schedule is used or `plan.stop`; checkpoints record the finished shards."""
    ds = ShardStream(data.source, plan.transform, plan.local_bs, seed=cfg.seed, epoch=prog.epoch, start=prog.shards_done,
                     rank=d.rank, world=d.world, split=cfg.split or None, buffer_size=cfg.shuffle_buffer)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=cfg.num_workers, persistent_workers=False)
    feed = _StreamFeed(loader, data, cfg, d, prog.epoch, prog.shards_done)
    end = min(plan.stop, prog.epoch_step0 + plan.steps_per_epoch)
    ran_out = False
    while prog.step < end:
        step_loss = _optimizer_step(tr, feed, cfg, d, prog, stream=True)
        if step_loss is None:
            ran_out = True
            break
        _record_step(tr, prog, step_loss, pbar)
        if _checkpoint_due(cfg, plan, prog):
            prog.shards_done = feed.shards_done(d)
            _save_checkpoint(ckpt, tr, cfg, data, prog, d)
    if ran_out or prog.step >= prog.epoch_step0 + plan.steps_per_epoch:
        prog.epoch, prog.shards_done, prog.epoch_step0 = prog.epoch + 1, 0, prog.step
    else:                                             # stopped inside the epoch (--max-steps): where to resume
        prog.shards_done = feed.shards_done(d)


def _train(tr: _Trainer, plan: _Plan, data: _Data, cfg: PretrainConfig, d: _Dist, prog: _Progress, ckpt: Path, progress: bool) -> float:
    """Run epochs until `plan.stop` (a streamed source: or its last epoch; a progress bar on the main
    process); returns the seconds it took."""
    pbar = None
    if progress and d.main:
        pbar = progress_bar(total=plan.stop, initial=min(prog.step, plan.stop), desc=f"pretrain {tr.bb.spec}", unit="step")
    t0 = time.perf_counter()
    tr.model.train()
    _freeze_batchnorm(tr.model)
    while prog.step < plan.stop and (data.source is None or prog.epoch < cfg.epochs):
        (_run_epoch if data.source is None else _run_stream_epoch)(tr, plan, data, cfg, d, prog, pbar, ckpt)
    seconds = time.perf_counter() - t0
    if pbar is not None:
        pbar.close()
    if data.source is not None and not prog.losses:
        raise UserError(f"data source {data.source.spec}: no batch of {plan.local_bs} readable samples of split {cfg.split!r} came out of its shards "
                        f"(skipped: {dict(data.skip_counts)}); check the shards and --split")
    return seconds


# ---------------------------------------------------------------------------------------------
# the result


def _write_bundle(out: Path, data_arg: str | os.PathLike, tr: _Trainer, data: _Data, cfg: PretrainConfig, d: _Dist, prog: _Progress) -> str | None:
    """Write backbone.safetensors (recorded in the bundle's manifest) and the loss log; main process only,
    so the others return None for the hash."""
    tr.model.eval()
    tr.bb.invalidate_hash()
    if not d.main:
        return None
    bb = tr.bb
    backbone_hash = bb.hash
    bundle = Bundle(out, create=True)
    bundle.write_part(
        "backbone",
        bb.save_weights,
        base_spec=bb.spec,
        backbone_hash=backbone_hash,
        data=str(data_arg),
        caption_cells_hash=data.geocells.hash,
        steps=prog.step,
        images=int(data.n),
        config=asdict(cfg),
        world_size=d.world,
    )
    bundle.set_backbone(bb.spec, backbone_hash)
    with atomic_path(out / CHECKPOINT_DIR / "losses.json") as tmp:
        tmp.write_text(json.dumps({"losses": prog.losses, "steps": prog.step, "world_size": d.world}))
    return backbone_hash


def _skips(data: _Data, plan: _Plan, d: _Dist) -> tuple[list[str], dict[str, int]]:
    """What was skipped: names (unreadable images) and counts by reason; a streamed source's from every
    process (each skipped its own shards' samples)."""
    if data.source is None:
        names = data.skipped + plan.ds.skipped
        return names, ({"unreadable image": len(names)} if names else {})
    mine = (dict(data.skip_counts), list(data.skipped))
    every = [mine]
    if d.world > 1:
        every = [None] * d.world
        dist.all_gather_object(every, mine)
    counts: Counter = Counter()
    for c, _ in every:
        counts.update(c)
    return [n for _, names in every for n in names], dict(counts)


def pretrain(
    data: str | os.PathLike,
    cells: str | os.PathLike | GeoCells,
    backbone: str,
    out: str | os.PathLike,
    config: PretrainConfig | None = None,
    resume: bool = False,
    progress: bool = True,
    device: str | None = None,
) -> PretrainResult:
    """Fine-tune `backbone` on `data` (a manifest, WebDataset shards or image Parquet) with captions from
    `cells` (a path or a GeoCells); write `backbone.safetensors` into the bundle folder `out` and return
    the loss trajectory."""
    cfg = config or PretrainConfig()
    _check_options(cfg, backbone)
    out = Path(out)
    d = _setup_distributed(device)
    local_bs = _local_batch_size(cfg, d)
    rows = _load_data(data, cells, cfg, d)
    bb = _load_backbone(backbone, cfg, d)
    plan = _plan(bb, rows, cfg, d, local_bs)
    tr = _optimiser(bb, cfg, d, plan.total_steps)
    ckpt = _checkpoint_path(out)
    prog = _resume(ckpt, tr, cfg, rows) if resume else _Progress()
    _wrap_for_training(tr, d)
    seconds = _train(tr, plan, rows, cfg, d, prog, ckpt, progress)
    _save_checkpoint(ckpt, tr, cfg, rows, prog, d)
    skipped, counts = _skips(rows, plan, d)
    backbone_hash = _write_bundle(out, data, tr, rows, cfg, d, prog)
    _teardown(d)
    return PretrainResult(
        losses=prog.losses, steps=prog.step, images=prog.images, seconds=seconds,
        images_per_s=prog.images / seconds if seconds > 0 else 0.0,
        backbone_hash=backbone_hash, bundle=str(out), skipped=skipped, skipped_counts=counts,
    )


def contrastive_loss(backbone: Backbone, df: pd.DataFrame, captions: list[str], batch_size: int = 64) -> float:
    """Mean symmetric InfoNCE of a backbone over (image, caption) pairs in fixed batches, eval mode,
    no augmentation: a deterministic yardstick for what pretraining did."""
    loss_fn = ClipLoss()
    was = backbone.model.training
    backbone.model.eval()
    total, n = 0.0, 0
    try:
        with torch.no_grad():
            paths = df["path"].to_numpy()
            for s in range(0, len(df), batch_size):
                x = torch.stack([backbone.preprocess(load_image(p)) for p in paths[s : s + batch_size]])
                t = backbone.tokenize(captions[s : s + batch_size])
                i_f = backbone.encode_image(x)
                t_f = backbone.encode_text(t)
                scale = backbone.model.logit_scale.exp()
                total += float(loss_fn(i_f, t_f, scale)) * len(x)
                n += len(x)
    finally:
        backbone.model.train(was)
    return total / max(n, 1)
