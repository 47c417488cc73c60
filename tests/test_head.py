"""Haversine label smoothing (hand-computed), the prototype head, its file, text prototypes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pigeon.core.errors import UserError
from pigeon.head import BatchTargets, PrototypeHead, cell_captions, mean_prototypes

CENTRES = np.array([[0.0, 0.0], [0.0, 1.0], [0.0, 2.0]])  # 111.195 km apart on the equator


def smoothed_targets(lat, lon, cell, centres, tau_km):
    """The soft targets of photos (lat, lon) with true cells `cell`: the head's one formula, `BatchTargets`."""
    return BatchTargets(lat, lon, cell, centres, tau_km)(np.arange(len(lat))).numpy()


def test_smoothing_hand_computed_at_true_centre():
    t = smoothed_targets(np.array([0.0]), np.array([0.0]), np.array([0]), CENTRES, tau_km=65.0)
    # weights exp(-d/65) for d = 0, 111.195, 222.390 km: 1, 0.180760, 0.032674; normalised:
    np.testing.assert_allclose(t[0], [0.824125, 0.148953, 0.026922], atol=2e-5)
    assert t.sum() == pytest.approx(1.0)


def test_smoothing_measured_from_the_true_location():
    # x = (0, 0.9): d = 100.0756, 11.1195, 122.3146 km; z = -(d - d_true)/65 = 0, 1.368555, -0.342139
    t = smoothed_targets(np.array([0.0]), np.array([0.9]), np.array([0]), CENTRES, tau_km=65.0)
    np.testing.assert_allclose(t[0], [0.177307, 0.696760, 0.125932], atol=2e-5)


def test_smoothing_tau_limits():
    sharp = smoothed_targets(np.array([0.0]), np.array([0.0]), np.array([0]), CENTRES, tau_km=1.0)
    flat = smoothed_targets(np.array([0.0]), np.array([0.0]), np.array([0]), CENTRES, tau_km=1e7)
    assert sharp[0, 0] == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(flat[0], 1 / 3, atol=1e-4)
    with pytest.raises(UserError, match="tau 0.0: label smoothing's distance scale must be a positive number of km"):
        smoothed_targets(np.array([0.0]), np.array([0.0]), np.array([0]), CENTRES, tau_km=0.0)


def test_head_logits_are_scaled_cosines(tmp_path):
    protos = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    head = PrototypeHead(protos, scale=10.0)
    x = torch.tensor([[1.0, 1.0, 0.0]])
    z = head(x)
    np.testing.assert_allclose(z.detach().numpy(), [[10 / math.sqrt(2), 10 / math.sqrt(2)]], rtol=1e-5)
    head.temperature.fill_(2.0)
    np.testing.assert_allclose(head(x, calibrated=True).detach().numpy(), z.detach().numpy() / 2, rtol=1e-6)
    head.save(tmp_path / "h.safetensors")
    back = PrototypeHead.load(tmp_path / "h.safetensors")
    assert back.temperature.item() == pytest.approx(2.0)
    np.testing.assert_allclose(back(x).detach().numpy(), z.detach().numpy(), rtol=1e-6)


def test_head_file_keeps_radius_model(tmp_path):
    from pigeon.calibration import RadiusModel

    head = PrototypeHead(np.eye(3), scale=10.0)
    head.save(tmp_path / "plain.safetensors")
    assert PrototypeHead.load(tmp_path / "plain.safetensors").radius is None   # heads without spreads still load
    head.radius = RadiusModel(np.linspace(1, 48, 48).reshape(3, 16), np.array([0.5, 0.9]), np.array([1.2, 0.9]), calibrated=True)
    head.save(tmp_path / "h.safetensors")
    back = PrototypeHead.load(tmp_path / "h.safetensors").radius
    np.testing.assert_allclose(back.spread_km, head.radius.spread_km, rtol=1e-6)
    np.testing.assert_allclose(back.scales, [1.2, 0.9], rtol=1e-6)
    assert back.calibrated
    head.radius = RadiusModel(np.ones((2, 16)))                                 # spreads for 2 cells, 3 prototypes
    head.save(tmp_path / "bad.safetensors")
    with pytest.raises(UserError, match="spreads for 2 cells"):
        PrototypeHead.load(tmp_path / "bad.safetensors")


def test_head_file_errors(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="bad.safetensors"):
        PrototypeHead.load(bad)


def test_mean_prototypes_centred_and_fallback():
    emb = np.array([[1.0, 0.0], [1.0, 0.2], [0.0, 1.0]], np.float32)
    fb = np.array([[0.0, 0.0], [0.0, 0.0], [0.6, 0.8]], np.float32)
    p = mean_prototypes(emb, np.array([0, 0, 1]), 3, fallback=fb)
    assert np.allclose(np.linalg.norm(p, axis=1), 1.0)
    assert p[2] == pytest.approx([0.6, 0.8])
    assert p[0, 0] > 0.99 and p[1, 1] == pytest.approx(1.0)


def test_captions_and_text_prototypes():
    import pandas as pd

    from pigeon.backbones import create_backbone
    from pigeon.head import text_prototypes

    gdf = pd.DataFrame({"admin1": ["Bavaria", None], "country": ["Germany", "Kenya"]})
    assert cell_captions(gdf) == ["A photo taken in Bavaria, Germany.", "A photo taken in Kenya."]
    torch.set_num_threads(2)
    bb = create_backbone("tiny")
    p = text_prototypes(bb, gdf)
    assert p.shape == (2, bb.embed_dim)
    assert np.allclose(np.linalg.norm(p, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(p[0], p[1])
