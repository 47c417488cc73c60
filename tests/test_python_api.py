"""The public Python API (`import pigeon`): `pigeon.load` -> a Predictor that locates, refinement
chosen by name, `pigeon.create_backbone` / `pigeon.list_backbones`, and an import free of torch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import pigeon


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A zero-shot `tiny` bundle over a synthetic world (tests/worlds.py) with a gallery of its train photos."""
    from worlds import world_bundle

    from pigeon.indexing import build_index

    root = tmp_path_factory.mktemp("pyapi")
    _, df, bpath, _ = world_bundle(root, n_images=160, image_size=48, seed=11, min_size=10, max_size=25)
    df[df["split"] == "train"].to_csv(root / "world" / "gallery.csv", index=False)
    build_index(root / "world" / "gallery.csv", bpath, progress=False, batch_size=32, validate=False)
    queries = [str(root / "world" / p) for p in df.loc[df["split"] == "test", "image"][:8]]
    return bpath, queries


def test_load_returns_a_predictor_that_locates(world):
    bpath, queries = world
    predictor = pigeon.load(bpath, device="cpu")
    assert isinstance(predictor, pigeon.Predictor)
    assert predictor.refine.mode == "cluster+nn"  # no recorded mode (validate=False): PIGEON's default
    answers = predictor.locate(queries)
    assert len(answers) == len(queries)
    for a in answers:
        assert -90 <= a["lat"] <= 90 and -180 <= a["lon"] <= 180
        assert 0 <= a["radius_km_50"] <= a["radius_km_90"] and a["countries"][0]["name"]
        assert a["refinement"]["mode"] in ("cluster+nn", "cluster", "nn", "cell")
    moved = [a["refinement"]["moved_km"] for a in answers]
    assert max(moved) > 0  # the gallery moved some answers off their cell centre
    assert pigeon.load(bpath, refine=pigeon.RefineConfig(mode="cluster+nn")).locate(queries[:2])[0]["lat"] == answers[0]["lat"]


def test_refine_none_answers_at_cell_centres(world):
    bpath, queries = world
    refined = pigeon.load(bpath).locate(queries)
    answers = pigeon.load(bpath, refine="none").locate(queries)
    for a in answers:
        top = a["top_cells"][0]
        assert (a["lat"], a["lon"]) == (top["lat"], top["lon"])
        assert a["refinement"]["mode"] == "cell" and a["refinement"]["moved_km"] == 0.0
    assert [a["top_cells"][0]["cell_id"] for a in answers] == [a["top_cells"][0]["cell_id"] for a in refined]
    assert any((a["lat"], a["lon"]) != (r["lat"], r["lon"]) for a, r in zip(answers, refined))


def test_load_refuses_an_unknown_refinement_mode(world):
    with pytest.raises(pigeon.UserError, match="unknown refinement mode; use one of none, cluster, nn, cluster\\+nn"):
        pigeon.load(world[0], refine="fast")


def test_create_and_list_backbones():
    bb = pigeon.create_backbone("tiny")
    assert (bb.spec, bb.embed_dim) == ("tiny", 32)
    e = bb.embed_texts(["A photo taken in Lima, Peru."])
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert {"tiny", "lite", "open_clip:ARCH:TAG"} <= set(pigeon.list_backbones())
    assert isinstance(pigeon.BackboneCfg("pigeon-tiny"), pigeon.BackboneCfg) and callable(pigeon.register_backbone)


def test_import_pigeon_does_not_import_torch():
    code = "import pigeon, sys; assert 'torch' not in sys.modules, 'torch'; assert 'open_clip' not in sys.modules; print(sorted(pigeon.__all__))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "create_backbone" in r.stdout and "load" in r.stdout
