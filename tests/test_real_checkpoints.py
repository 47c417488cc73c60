"""The paths a user online takes, run here offline on real checkpoints (issue 12).

Small randomly initialised models are saved the way the libraries and the hub store them, and each
is run through every command (`train --zero-shot`, `train`, `build-index`, `locate`, `serve`):

- `hf:/dir`: a transformers `CLIPModel` + `CLIPProcessor` written by `save_pretrained` (transformers'
  current layout: processor_config.json, tokenizer.json, model.safetensors);
- `hf:org/name`: the same kind of model as a hub cache (blobs/, snapshots/<commit>/ of symlinks,
  refs/main) laid out as StreetCLIP's repo is (preprocessor_config.json with integer sizes,
  pytorch_model.bin, vocab.json + merges.txt, OpenAI's legacy eos id 2), under HF_HUB_OFFLINE;
- `open_clip:ARCH:/file`: an open_clip training checkpoint ({"epoch", "state_dict"} with DDP's
  "module." prefixes);
- `open_clip:ARCH:TAG`: open_clip has no pretrained tag for an architecture small enough to run every
  command here, so a tag `hubtest` is registered for `pigeon-tiny` pointing at the hub repo
  `pigeon-test/tiny-open-clip` (with PE-Core's preprocessing: mean/std 0.5, bilinear, squash), whose
  cache is pre-filled; and one real tag, `PE-Core-T-16-384:meta` (timm/PE-Core-T-16-384), is
  resolved from a pre-filled cache too, for its weights and preprocessing.

Preprocessing is compared with the libraries' own (`CLIPProcessor`, `create_model_and_transforms`)
bit for bit, on square, non-square, tiny, huge and grey images. Bad inputs get one line naming the
input and the fix (exit 2).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
import transformers
import uvicorn
from fastapi.testclient import TestClient
from huggingface_hub import constants as hub_constants
from open_clip.tokenizer import bytes_to_unicode, default_bpe
from PIL import Image
from safetensors.torch import load_file, save_file

from pigeon.backbones import create_backbone, state_dict_hash
from pigeon.bundle import Bundle
from worlds import cli

torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parents[1]
HUB_CLIP = "pigeon-test/tiny-streetclip"  # a transformers CLIPModel in the hub cache (StreetCLIP's layout)
HUB_OPEN_CLIP = "pigeon-test/tiny-open-clip"  # the repo of the registered open_clip tag `pigeon-tiny:hubtest`
TAG_CFG = {"url": "", "hf_hub": f"{HUB_OPEN_CLIP}/", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
           "interpolation": "bilinear", "resize_mode": "squash"}  # as open_clip's PE-Core tags
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
TEXTS = ["A photo taken in Lima, Peru.", "a street", "Ein Foto aus München, Deutschland, mit Straßenbahn und Schnee " * 9]


# -- checkpoints, saved as the libraries and the hub save them ------------------------------------


def _clip_tokenizer(folder: Path) -> transformers.CLIPTokenizer:
    """OpenAI's CLIP tokenizer (StreetCLIP's), built offline from the BPE merges open_clip ships: the
    vocabulary is the 512 byte symbols, the 48,894 merges and the two specials, as in vocab.json on the hub."""
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return transformers.CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))


def _tiny_clip(seed: int, **text: int) -> transformers.CLIPModel:
    cfg = transformers.CLIPConfig(text_config=dict(SMALL, vocab_size=49408, max_position_embeddings=77, **text),
                                  vision_config=dict(SMALL, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(seed)
    return transformers.CLIPModel(cfg)


def _hub_cache(cache: Path, repo: str, files: dict[str, Path]) -> Path:
    """Move `files` into the layout huggingface_hub gives a download of `repo`: content-named blobs, a
    snapshot folder of relative symlinks named by a commit id, and refs/main holding that id."""
    base = cache / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(repo.encode()).hexdigest()
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    (base / "blobs").mkdir()
    for name, src in files.items():
        with open(src, "rb") as f:
            blob = base / "blobs" / hashlib.file_digest(f, "sha256").hexdigest()
        os.replace(src, blob)
        os.symlink(os.path.relpath(blob, snap), snap / name)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
    return snap


def _streetclip_layout(staging: Path, tok: transformers.CLIPTokenizer, bpe: Path) -> dict[str, Path]:
    """A tiny CLIPModel's files as StreetCLIP's repo holds them (older transformers wrote these)."""
    model = _tiny_clip(1, bos_token_id=0, eos_token_id=2, pad_token_id=1)  # OpenAI's config.json: legacy eos id 2
    model.save_pretrained(staging)
    torch.save(model.state_dict(), staging / "pytorch_model.bin")
    (staging / "model.safetensors").unlink()
    tok.save_pretrained(staging)  # tokenizer.json, tokenizer_config.json; the repo also has the slow files
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(bpe / name, staging / name)
    (staging / "special_tokens_map.json").write_text(json.dumps({k: "<|endoftext|>" for k in ("eos_token", "pad_token", "unk_token")}
                                                                | {"bos_token": "<|startoftext|>"}))
    (staging / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 32, "do_center_crop": True, "do_normalize": True, "do_resize": True, "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 32}))
    return {p.name: p for p in staging.iterdir()}


def _open_clip_weights(seed: int) -> dict[str, torch.Tensor]:
    """Random weights of pigeon's tiny open_clip architecture (not `tiny`'s own: another seed)."""
    bb = create_backbone("open_clip:pigeon-tiny:none")
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.02 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in bb.model.state_dict().items()}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> dict:
    """Every checkpoint of this module, written once: folders, a hub cache, open_clip files."""
    root = tmp_path_factory.mktemp("checkpoints")
    tok = _clip_tokenizer(root / "bpe")
    clip_dir = root / "clip"
    _tiny_clip(0).save_pretrained(clip_dir)
    ip = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    transformers.CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(clip_dir)
    cache = root / "hf_home" / "hub"
    _hub_cache(cache, HUB_CLIP, _streetclip_layout(root / "staging_clip", tok, root / "bpe"))
    tag_weights = _open_clip_weights(2)
    save_file(tag_weights, root / "open_clip_model.safetensors")
    _hub_cache(cache, HUB_OPEN_CLIP, {"open_clip_model.safetensors": root / "open_clip_model.safetensors"})
    file_weights = _open_clip_weights(3)
    torch.save({"epoch": 3, "name": "street-run", "state_dict": {f"module.{k}": v for k, v in file_weights.items()}}, root / "epoch_3.pt")
    return {"root": root, "clip_dir": clip_dir, "cache": cache, "oc_file": root / "epoch_3.pt",
            "oc_file_hash": state_dict_hash(file_weights), "oc_tag_hash": state_dict_hash(tag_weights)}


@pytest.fixture
def hub(ckpt, monkeypatch):
    """This module's hub cache as huggingface_hub's, offline, and the registered open_clip tag.

    huggingface_hub reads HF_HOME once, at import, into `constants.HF_HUB_CACHE` (read at every call),
    so in this process the constant is pointed at the cache; the subprocess test sets HF_HOME itself.
    open_clip has no public way to add a pretrained tag: its table is patched for the test."""
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(ckpt["cache"]))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "pigeon-tiny", {"hubtest": TAG_CFG})
    return ckpt


def _spec(kind: str, ckpt: dict) -> str:
    return {"hf_dir": f"hf:{ckpt['clip_dir']}", "hf_hub": f"hf:{HUB_CLIP}", "oc_file": f"open_clip:pigeon-tiny:{ckpt['oc_file']}",
            "oc_tag": "open_clip:pigeon-tiny:hubtest"}[kind]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One small synthetic world and its cells (`pigeon build-cells`), shared by every backbone."""
    from pigeon.datasets.synthetic import make_world

    root = tmp_path_factory.mktemp("world")
    manifest = make_world(root / "world", n_images=60, image_size=48, seed=12)
    cells = root / "cells_bundle"
    assert cli(["build-cells", "--points", str(manifest), "--out", str(cells / "cells.parquet"), "--min-size", "8", "--max-size", "16", "-q"]) == 0
    return root, manifest, pd.read_csv(manifest), cells


def _images() -> list[Image.Image]:
    """Square, landscape, portrait, extreme, smaller than the model, large, and grey images."""
    rng = np.random.default_rng(0)
    ims = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
           [(32, 32), (40, 56), (120, 90), (17, 300), (9, 11), (500, 333), (384, 384)]]
    return ims + [Image.fromarray(rng.integers(0, 256, (70, 50), dtype=np.uint8), mode="L")]


# -- every command, on every kind of checkpoint ------------------------------------------------


@pytest.mark.parametrize("kind", ["hf_dir", "hf_hub", "oc_file", "oc_tag"])
def test_every_command_runs_on_a_real_checkpoint(kind, hub, world, tmp_path, monkeypatch, capsys):
    spec = _spec(kind, hub)
    root, manifest, df, cells = world
    b = tmp_path / "bundle"
    shutil.copytree(cells, b)
    assert cli(["train", "--bundle", str(b), "--zero-shot", "--backbone", spec]) == 0, capsys.readouterr().err
    assert Bundle(b).backbone_spec == spec
    assert cli(["train", "--bundle", str(b), "--data", str(manifest), "--epochs", "1", "--batch-size", "32"]) == 0, capsys.readouterr().err
    assert cli(["build-index", "--bundle", str(b), "--images", str(manifest), "--batch-size", "32"]) == 0, capsys.readouterr().err
    photos = [root / "world" / name for name in df["image"][:2]]
    out = tmp_path / "answers.csv"
    assert cli(["locate", *map(str, photos), "--bundle", str(b), "--out", str(out)]) == 0, capsys.readouterr().err
    table = pd.read_csv(out)
    assert len(table) == 2 and table[["lat", "lon"]].abs().max().max() <= 180

    answers = []

    def run_in_test_client(app, **kwargs):  # `pigeon serve` built the app for uvicorn; ask it one question instead
        with TestClient(app) as client:
            answers.append(client.post("/locate", files={"image": ("p.png", photos[0].read_bytes(), "image/png")}))

    monkeypatch.setattr(uvicorn, "run", run_in_test_client)
    assert cli(["serve", "--bundle", str(b)]) == 0
    assert answers[0].status_code == 200, answers[0].text
    assert (answers[0].json()["lat"], answers[0].json()["lon"]) == pytest.approx((table["lat"][0], table["lon"][0]), abs=1e-4)


def test_hub_cache_through_hf_home_in_a_fresh_process(ckpt, world, tmp_path):
    """A user's own environment: HF_HOME names the cache and HF_HUB_OFFLINE=1, read by a fresh `pigeon`."""
    root, manifest, df, cells = world
    b = tmp_path / "bundle"
    shutil.copytree(cells, b)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE")}
    env.update(HF_HOME=str(ckpt["cache"].parent), HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "pigeon.cli", "train", "--bundle", str(b), "--zero-shot", "--backbone", f"hf:{HUB_CLIP}"],
                       env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert Bundle(b).backbone_spec == f"hf:{HUB_CLIP}"


# -- preprocessing, tokens and weights as the libraries give them ----------------------------------


@pytest.mark.parametrize("kind", ["hf_dir", "hf_hub"])
def test_hf_matches_transformers_to_the_last_bit(kind, hub):
    bb = create_backbone(_spec(kind, hub))
    ident = str(hub["clip_dir"]) if kind == "hf_dir" else HUB_CLIP
    proc = transformers.CLIPProcessor.from_pretrained(ident)
    clip = transformers.CLIPModel.from_pretrained(ident).eval()
    assert state_dict_hash(bb.model.clip.state_dict()) == state_dict_hash(clip.state_dict())
    ims = _images()
    for im in ims:
        ref = proc(images=im, return_tensors="pt")["pixel_values"][0]
        assert torch.equal(bb.preprocess(im), ref), (im.size, im.mode, float((bb.preprocess(im) - ref).abs().max()))
    assert (bb.image_size, bb.mean, bb.std) == (32, tuple(proc.image_processor.image_mean), tuple(proc.image_processor.image_std))
    with torch.no_grad():
        img_ref = clip.get_image_features(pixel_values=proc(images=ims, return_tensors="pt")["pixel_values"])
        enc = proc(text=TEXTS, padding=True, truncation=True, max_length=77, return_tensors="pt")  # as a transformers user writes it
        txt_ref = clip.get_text_features(**enc)
    img_ref, txt_ref = (torch.nn.functional.normalize(getattr(f, "pooler_output", f), dim=-1).numpy() for f in (img_ref, txt_ref))
    np.testing.assert_allclose(bb.embed_images(ims), img_ref, atol=1e-6)
    np.testing.assert_allclose(bb.embed_texts(TEXTS), txt_ref, atol=1e-6)  # padding to 77 or not: the same features
    fixed = proc(text=TEXTS, padding="max_length", truncation=True, max_length=77, return_tensors="pt")["input_ids"]
    assert torch.equal(bb.tokenize(TEXTS), fixed)
    oc = open_clip.get_tokenizer("ViT-B-32")(TEXTS)  # OpenAI's BPE, as open_clip has it (padding with 0, not end-of-text)
    assert torch.equal(bb.tokenize(TEXTS)[oc != 0], oc[oc != 0])


@pytest.mark.parametrize("kind", ["oc_file", "oc_tag"])
def test_open_clip_matches_open_clip_to_the_last_bit(kind, hub):
    spec = _spec(kind, hub)
    bb = create_backbone(spec)
    weights = spec.split(":", 2)[2]
    model, _, pre = open_clip.create_model_and_transforms("pigeon-tiny", pretrained=weights)
    assert bb.hash == state_dict_hash(model.state_dict()) == hub[f"{kind}_hash"]
    ims = _images()
    for im in ims:
        assert torch.equal(bb.preprocess(im), pre(im)), (im.size, im.mode)
    assert bb.mean == ((0.5,) * 3 if kind == "oc_tag" else tuple(open_clip.OPENAI_DATASET_MEAN))  # the tag's own normalisation
    with torch.no_grad():
        ref = model.eval().encode_image(torch.stack([pre(im) for im in ims]), normalize=True).numpy()
    np.testing.assert_allclose(bb.embed_images(ims), ref, atol=1e-6)
    assert torch.equal(bb.tokenize(TEXTS), open_clip.get_tokenizer("pigeon-tiny")(TEXTS))


def test_a_real_open_clip_tag_from_a_prefilled_cache(tmp_path, monkeypatch):
    """`open_clip:PE-Core-T-16-384:meta` resolved as open_clip resolves it (timm/PE-Core-T-16-384 in the hub
    cache), with random weights of the real architecture: the file's weights, the tag's preprocessing."""
    arch, repo = "PE-Core-T-16-384", "timm/PE-Core-T-16-384"
    with torch.device("meta"):  # shapes only: no time spent on an initialisation that is thrown away
        shapes = open_clip.create_model(arch, device="meta").state_dict()
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.empty(v.shape, dtype=torch.float16).uniform_(-0.05, 0.05, generator=g) for k, v in shapes.items()}
    save_file(sd, tmp_path / "w.safetensors")
    _hub_cache(tmp_path / "hub", repo, {"open_clip_model.safetensors": tmp_path / "w.safetensors"})
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    bb = create_backbone(f"open_clip:{arch}:meta")
    assert bb.hash == state_dict_hash({k: v.float() for k, v in sd.items()})  # the cached file's weights, in fp32
    with torch.device("meta"):  # open_clip's own transforms for the tag, the weights left out
        _, _, pre = open_clip.create_model_and_transforms(arch, pretrained="meta", load_weights=False, device="meta")
    for im in _images():
        assert torch.equal(bb.preprocess(im), pre(im)), (im.size, im.mode)
    assert (bb.image_size, bb.mean, bb.std) == (384, (0.5,) * 3, (0.5,) * 3)
    assert bb.embed_dim == 512 and bb.embed_images(_images()[:1]).shape == bb.embed_texts(["a street"]).shape == (1, 512)
    assert {k: len(blocks) for k, (blocks, _) in bb.towers().items()} == {"image": 12, "text": 12}
    assert 0 < bb.set_trainable(1) < bb.set_trainable(-1)


# -- bad input: one line naming the input and the fix, exit 2 -------------------------------------


def _refused(spec: str, cells: Path, tmp_path: Path, capsys) -> str:
    b = tmp_path / "bundle"
    shutil.copytree(cells, b)
    assert cli(["train", "--bundle", str(b), "--zero-shot", "--backbone", spec]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def _folder_without(src: Path, dst: Path, *names: str) -> Path:
    shutil.copytree(src, dst)
    for n in names:
        (dst / n).unlink()
    return dst


def test_hf_folders_that_are_not_a_clip_model(hub, world, tmp_path, capsys):
    cells = world[3]
    no_config = _folder_without(hub["clip_dir"], tmp_path / "no_config", "config.json")
    msg = _refused(f"hf:{no_config}", cells, tmp_path / "a", capsys)
    assert str(no_config) in msg and "no config.json" in msg and "CLIPModel.save_pretrained" in msg

    vision = tmp_path / "vision_only"  # a CLIPVisionModel: transformers would fill the text tower with random weights
    torch.manual_seed(0)
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**SMALL, image_size=32, patch_size=8)).save_pretrained(vision)
    for f in ("processor_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hub["clip_dir"] / f, vision / f)
    msg = _refused(f"hf:{vision}", cells, tmp_path / "b", capsys)
    assert str(vision) in msg and "vision-only" in msg and "full transformers CLIPModel" in msg

    bert = tmp_path / "bert"
    transformers.BertModel(transformers.BertConfig(**SMALL, vocab_size=64)).save_pretrained(bert)
    msg = _refused(f"hf:{bert}", cells, tmp_path / "c", capsys)
    assert str(bert) in msg and "'bert' model" in msg and "not a CLIPModel" in msg

    no_tok = _folder_without(hub["clip_dir"], tmp_path / "no_tokenizer", "tokenizer.json", "tokenizer_config.json")
    msg = _refused(f"hf:{no_tok}", cells, tmp_path / "d", capsys)  # transformers would build a tokenizer of 2 tokens
    assert str(no_tok) in msg and "tokenizer" in msg and "CLIPProcessor.save_pretrained" in msg

    no_proc = _folder_without(hub["clip_dir"], tmp_path / "no_processor", "processor_config.json")
    msg = _refused(f"hf:{no_proc}", cells, tmp_path / "e", capsys)
    assert str(no_proc) in msg and "image processor" in msg


def test_open_clip_checkpoints_of_another_architecture(hub, world, tmp_path, capsys):
    cells = world[3]
    other = open_clip.model.CLIP(embed_dim=48, vision_cfg={"image_size": 64, "layers": 2, "width": 48, "head_width": 16, "patch_size": 16},
                                 text_cfg={"context_length": 77, "vocab_size": 49408, "width": 48, "heads": 4, "layers": 2})
    torch.save(other.state_dict(), tmp_path / "wider.pt")
    msg = _refused(f"open_clip:pigeon-tiny:{tmp_path / 'wider.pt'}", cells, tmp_path / "a", capsys)
    assert str(tmp_path / "wider.pt") in msg and "another shape" in msg and "open_clip:ARCH:" in msg

    hf_weights = hub["clip_dir"] / "model.safetensors"  # a transformers checkpoint given to open_clip
    msg = _refused(f"open_clip:pigeon-tiny:{hf_weights}", cells, tmp_path / "b", capsys)
    assert str(hf_weights) in msg and "transformers CLIPModel" in msg and "hf:/path/to/folder" in msg

    msg = _refused("open_clip:pigeon-tiny:laion2b", cells, tmp_path / "c", capsys)
    assert "no pretrained tag 'laion2b'" in msg and "hubtest" in msg


def test_a_model_missing_from_the_cache_names_the_two_ways_out(hub, world, tmp_path, capsys):
    msg = _refused("hf:pigeon-test/absent", world[3], tmp_path / "a", capsys)
    assert "pigeon-test/absent is not cached here" in msg and str(hub["cache"]) in msg
    assert "hf download pigeon-test/absent" in msg and "hf auth login" in msg and "hf:/path/to/folder" in msg
    msg = _refused("open_clip:PE-Core-T-16-384:meta", world[3], tmp_path / "b", capsys)  # the repo open_clip's tag points at
    assert "timm/PE-Core-T-16-384 is not cached here" in msg and "hf download timm/PE-Core-T-16-384" in msg
    assert "open_clip:PE-Core-T-16-384:/path/model.pt" in msg and "lite" in msg


def test_a_gated_or_unknown_hub_model_online_names_the_ways_out(hub, world, tmp_path, capsys, monkeypatch):
    """Online, against a hub that answers as huggingface.co does (401 GatedRepo, 404 RepoNotFound), served by
    a mock transport through huggingface_hub's public `set_client_factory`: no socket is opened."""
    import huggingface_hub
    httpx = pytest.importorskip("httpx2")  # the HTTP client this huggingface_hub speaks through

    def hub_answer(request):
        if "/gated-model/" in str(request.url):
            return httpx.Response(401, headers={"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to model is restricted."}, request=request)
        return httpx.Response(404, headers={"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, request=request)

    def no_network(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    huggingface_hub.set_client_factory(lambda: httpx.Client(transport=httpx.MockTransport(hub_answer), follow_redirects=True))
    try:
        msg = _refused("hf:pigeon-test/gated-model", world[3], tmp_path / "a", capsys)
        assert "pigeon-test/gated-model is a gated model" in msg and "https://huggingface.co/pigeon-test/gated-model" in msg
        assert "hf auth login" in msg and "hf:/path/to/folder" in msg
        msg = _refused("hf:pigeon-test/no-such-model", world[3], tmp_path / "b", capsys)
        assert "the hub has no model pigeon-test/no-such-model" in msg and "hf:/path/to/folder" in msg
    finally:
        huggingface_hub.set_client_factory(huggingface_hub.utils._http.default_client_factory)


def test_a_local_folder_never_asks_the_hub(hub, monkeypatch):
    """Online (HF_HUB_OFFLINE unset) with the network cut: a folder spec loads from the folder alone."""
    def no_network(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    assert create_backbone(_spec("hf_dir", hub)).embed_texts(["a street"]).shape == (1, 16)
