"""Contrastive pretraining of a backbone on photos and synthetic captions, as PIGEON fine-tunes CLIP.

Symmetric InfoNCE between images and their captions (open_clip's `ClipLoss`), a freeze policy (the
last N blocks of each tower, the heads/projections and the logit scale train), AdamW with linear
warm-up and cosine decay, gradient accumulation, mixed precision on CUDA, checkpoints with
`resume`, and the result written as `backbone.safetensors` into a bundle.

It runs unchanged under `torchrun --nproc_per_node=N` (DistributedDataParallel; gloo on CPU, nccl
on GPU). `batch_size` is the global contrastive batch: each of N processes takes batch_size/N
samples of the same global order and features are all-gathered (with gradients) before the loss,
so N processes follow the single-process trajectory.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .core.errors import UserError

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
    split: str = "train"


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


# ---------------------------------------------------------------------------------------------
# distributed plumbing


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"
    started_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device: str | None) -> _Dist:
    """Join the process group torchrun describes (WORLD_SIZE > 1), or run alone."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if device is None:
        device = f"cuda:{local}" if cuda else "cpu"
    elif cuda and world > 1:
        device = f"cuda:{local}"
    if cuda:
        torch.cuda.set_device(torch.device(device))
    started = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        started = True
    if world > 1:
        rank, world = dist.get_rank(), dist.get_world_size()
    return _Dist(rank=rank, world=world, local_rank=local, device=device, started_here=started)


def _barrier(d: _Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


# ---------------------------------------------------------------------------------------------
# schedule, optimizer


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1 over `warmup` steps, then cosine decay to 0 at `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


def _param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
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


def _freeze_batchnorm(model) -> None:
    """BatchNorm layers stay in eval mode: small contrastive batches give noisy statistics, and
    per-process statistics would make N processes differ from one."""
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


# ---------------------------------------------------------------------------------------------
# data


def _usable_rows(df, strict: bool) -> tuple[np.ndarray, list[str]]:
    """Rows whose image header opens (cheap: no decoding); the others are skipped and named, or refused when strict."""
    from PIL import Image

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


def _checkpoint_path(out: Path) -> Path:
    return Path(out) / CHECKPOINT_DIR / "checkpoint.pt"


_RESUME_KEYS = ("batch_size", "accum", "epochs", "seed", "unfreeze_last", "lr", "warmup", "oversample", "augment", "hflip", "split")


# ---------------------------------------------------------------------------------------------
# the loop


def pretrain(
    data: str | os.PathLike,
    cells: str | os.PathLike | Any,
    backbone: str,
    out: str | os.PathLike,
    config: PretrainConfig | None = None,
    resume: bool = False,
    progress: bool = True,
    device: str | None = None,
) -> PretrainResult:
    """Fine-tune `backbone` on the manifest `data` with captions from `cells` (a path or a GeoCells);
    write `backbone.safetensors` into the bundle folder `out` and return the loss trajectory."""
    import torch
    from open_clip.loss import ClipLoss

    from pigeon.geocells import GeoCells
    from pigeon.core.io import atomic_path

    from .backbones import create_backbone
    from .bundle import Bundle
    from .captions import CaptionMaker
    from .datasets import EpochSampler, ImageDataset, rare_cell_weights, read_manifest

    cfg = config or PretrainConfig()
    from .backbones import parse_spec

    parse_spec(backbone)  # a bad spec fails before any data is read
    warnings.filterwarnings("ignore", message=".*all_gather is deprecated.*", category=FutureWarning)
    if cfg.batch_size < 2:
        raise UserError(f"--batch-size {cfg.batch_size}: contrastive training needs at least 2 images per batch")
    if cfg.accum < 1 or cfg.epochs < 1:
        raise UserError("--accum and --epochs must be at least 1")
    out = Path(out)
    d = _setup_distributed(device)
    if cfg.batch_size % d.world:
        raise UserError(f"--batch-size {cfg.batch_size} is global; it must be a multiple of the {d.world} processes")
    local_bs = cfg.batch_size // d.world

    # -- data and captions -------------------------------------------------------------------
    df = read_manifest(data, strict=cfg.strict)
    if cfg.split and "split" in df.columns and (df["split"] == cfg.split).any():
        df = df[df["split"] == cfg.split].reset_index(drop=True)
    elif cfg.split and (df["split"] != "train").all() and cfg.split == "train":
        raise UserError(f"manifest {data} has no rows with split == 'train'; mark training rows or pass another split")
    ok, skipped = _usable_rows(df, cfg.strict)
    df = df[ok].reset_index(drop=True)
    step_samples = cfg.batch_size * cfg.accum
    if len(df) < step_samples:
        raise UserError(f"manifest {data} has {len(df)} readable training images, fewer than one optimizer step needs (batch size {cfg.batch_size} x accum {cfg.accum}); lower --batch-size")
    geocells = cells if isinstance(cells, GeoCells) else GeoCells.load(cells)
    maker = CaptionMaker(geocells, seed=cfg.seed)
    facts = maker.facts(df["lat"].to_numpy(), df["lon"].to_numpy(), df["taken_at"], df["heading"].to_numpy())

    # -- model -------------------------------------------------------------------------------
    bb = create_backbone(backbone, device=d.device)
    model = bb.model
    n_train = bb.set_trainable(cfg.unfreeze_last)
    if n_train == 0:
        raise UserError(f"backbone {backbone}: nothing to train with --unfreeze-last {cfg.unfreeze_last}")
    from .datasets.augment import build_train_transform

    transform = build_train_transform(bb.image_size, bb.mean, bb.std, hflip=cfg.hflip) if cfg.augment else bb.preprocess
    ds = ImageDataset(df, transform, strict=cfg.strict, seed=cfg.seed)
    weights = rare_cell_weights(facts["cell"].to_numpy(), cfg.oversample) if cfg.oversample > 0 else None
    sampler = EpochSampler(len(df), seed=cfg.seed, weights=weights, rank=d.rank, world_size=d.world, drop_last_multiple=step_samples)
    steps_per_epoch = len(sampler.global_order()) // step_samples
    total_steps = steps_per_epoch * cfg.epochs
    warmup = int(cfg.warmup if cfg.warmup >= 1 else round(cfg.warmup * total_steps))

    groups = _param_groups(model, cfg.weight_decay)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, warmup))
    cuda = d.device.startswith("cuda")
    amp = cuda if cfg.amp is None else (cfg.amp and cuda)
    amp_dtype = torch.bfloat16 if (cuda and torch.cuda.is_bf16_supported()) else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp and amp_dtype == torch.float16)

    step, losses = 0, []
    ckpt = _checkpoint_path(out)
    if resume:
        if not ckpt.exists():
            raise UserError(f"--resume: no checkpoint at {ckpt}; start without --resume")
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if state["spec"] != bb.spec:
            raise UserError(f"--resume: the checkpoint {ckpt} trains {state['spec']!r}, not {bb.spec!r}; give the same --backbone or start afresh")
        diff = [k for k in _RESUME_KEYS if state["config"].get(k) != asdict(cfg).get(k)]
        if diff:
            raise UserError(f"--resume: options {', '.join(diff)} differ from the checkpoint's ({', '.join(k + '=' + repr(state['config'].get(k)) for k in diff)}); use the same options or start afresh")
        if state["n_rows"] != len(df):
            raise UserError(f"--resume: the checkpoint was trained on {state['n_rows']} images, the manifest now has {len(df)}; use the same data or start afresh")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, losses = int(state["step"]), list(state["losses"])

    train_model = model
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(model, device_ids=[d.local_rank] if cuda else None, broadcast_buffers=False)
    loss_fn = ClipLoss(local_loss=False, gather_with_grad=True, rank=d.rank, world_size=d.world)

    def save_checkpoint() -> None:
        if not d.main:
            return
        state = {
            "spec": bb.spec,
            "config": asdict(cfg),
            "n_rows": len(df),
            "step": step,
            "losses": losses,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
        }
        with atomic_path(ckpt) as tmp:
            torch.save(state, tmp)

    stop = total_steps if cfg.max_steps is None else min(total_steps, cfg.max_steps)
    pbar = None
    if progress and d.main:
        from tqdm.auto import tqdm

        pbar = tqdm(total=stop, initial=min(step, stop), desc=f"pretrain {bb.spec}", unit="step")
    images = 0
    t0 = time.perf_counter()
    model.train()
    _freeze_batchnorm(model)
    while step < stop:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch, skip=in_epoch * step_samples)
        ds.set_epoch(epoch)
        captions = maker.compose(facts, np.random.default_rng([cfg.seed, epoch]))
        loader = torch.utils.data.DataLoader(
            ds, batch_size=local_bs, sampler=sampler, collate_fn=ImageDataset.collate, num_workers=cfg.num_workers, drop_last=True,
            persistent_workers=False, pin_memory=cuda,
        )
        it = iter(loader)
        while step < stop and step // steps_per_epoch == epoch:
            opt.zero_grad(set_to_none=True)
            step_loss = 0.0
            for micro in range(cfg.accum):
                batch = next(it)
                if batch is None:
                    raise UserError("a whole batch of images was unreadable; check the manifest's files")
                x, idx = batch
                tokens = bb.tokenize([captions[i] for i in idx.tolist()])
                x, tokens = x.to(d.device, non_blocking=True), tokens.to(d.device, non_blocking=True)
                sync = micro == cfg.accum - 1 or d.world == 1
                ctx = train_model.no_sync() if (d.world > 1 and not sync) else _null()
                with ctx:
                    with torch.autocast("cuda", dtype=amp_dtype, enabled=amp):
                        out_ = train_model(image=x, text=tokens)
                        img_f, txt_f, scale = (out_["image_features"], out_["text_features"], out_["logit_scale"]) if isinstance(out_, dict) else out_[:3]
                        loss = loss_fn(img_f.float(), txt_f.float(), scale.float())
                    scaler.scale(loss / cfg.accum).backward()
                step_loss += float(loss.detach()) / cfg.accum
                images += len(idx) * d.world
            scaler.step(opt)
            scaler.update()
            sched.step()
            with torch.no_grad():
                ls = getattr(model, "logit_scale", None)
                if isinstance(ls, torch.nn.Parameter):
                    ls.clamp_(0, math.log(100))
            step += 1
            losses.append(step_loss)
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{sched.get_last_lr()[-1]:.2e}")
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < stop:
                save_checkpoint()
        del it, loader
    seconds = time.perf_counter() - t0
    if pbar is not None:
        pbar.close()
    save_checkpoint()
    skipped_all = skipped + ds.skipped

    backbone_hash = None
    model.eval()
    bb.invalidate_hash()
    if d.main:
        backbone_hash = bb.hash
        bundle = Bundle(out, create=True)
        bundle.write_part(
            "backbone",
            bb.save_weights,
            base_spec=bb.spec,
            backbone_hash=backbone_hash,
            data=str(data),
            caption_cells_hash=geocells.hash,
            steps=step,
            images=int(len(df)),
            config=asdict(cfg),
            world_size=d.world,
        )
        bundle.set_backbone(bb.spec, backbone_hash)
        with atomic_path(out / CHECKPOINT_DIR / "losses.json") as tmp:
            tmp.write_text(json.dumps({"losses": losses, "steps": step, "world_size": d.world}))
    _barrier(d)
    if d.started_here:
        import torch.distributed as dist

        dist.destroy_process_group()
    return PretrainResult(
        losses=losses, steps=step, images=images, seconds=seconds, images_per_s=images / seconds if seconds > 0 else 0.0,
        backbone_hash=backbone_hash, bundle=str(out), skipped=skipped_all,
    )


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def contrastive_loss(backbone, df, captions: list[str], batch_size: int = 64) -> float:
    """Mean symmetric InfoNCE of a backbone over (image, caption) pairs in fixed batches, eval mode,
    no augmentation: a deterministic yardstick for what pretraining did."""
    import torch
    from open_clip.loss import ClipLoss

    from .datasets import load_image

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
