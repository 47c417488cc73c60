"""`pigeon world`: the bundled world cells, the prompt ensemble, and a zero-shot bundle that loads and serves."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient

from api_support import encode, photo
from worlds import cli

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A world bundle made by the command, with `tiny` (the ensemble of every template: the default)."""
    out = tmp_path_factory.mktemp("w") / "world"
    assert cli(["world", "--backbone", "tiny", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def tiny():
    from pigeon.backbones import create_backbone

    return create_backbone("tiny")


def test_bundled_world_cells_are_small_and_cover_every_country():
    from pigeon.geocells import bundled

    f = bundled.data_path(bundled.WORLD_CELLS)
    assert f.stat().st_size <= 3_000_000
    cells = bundled.world_cells()
    g = cells.gdf
    assert 300 <= len(cells) <= 1500
    assert set(g["adm0_a3"]) == set(bundled.admin1()["adm0_a3"])  # every country can be named
    assert int(g["count"].sum()) == 100_000                        # every MP-16 photo is in a cell
    assert g["name"].is_unique and g["lat"].dtype == np.float32
    assert not g.geometry.is_empty.any() and g.geometry.is_valid.all()
    # small countries keep their own cells (build_cells on all points merges them into a neighbour)
    got = g["country"].to_numpy()[cells.cell_of([42.5063, 41.3275, 60.0973, 24.4539, 48.1374], [1.5218, 19.8187, 19.9348, 54.3773, 11.5755])]
    assert got.tolist() == ["Andorra", "Albania", "Aland", "United Arab Emirates", "Germany"]
    assert g["admin1"].to_numpy()[cells.cell_of(48.1374, 11.5755)][0] == "Bavaria"  # Munich: a region of its own, not split
    assert ((g["country"] == "Germany") & (g["admin1"] == "Bavaria")).sum() == 1


def test_ensemble_is_the_mean_of_the_templates(tiny):
    from pigeon.head import ZERO_SHOT_TEMPLATES, cell_captions, choose_templates, text_prototypes

    gdf = pd.DataFrame({"admin1": ["Bavaria", "", "Canillo"], "country": ["Germany", "Kenya", "Andorra"]})
    assert cell_captions(gdf, ZERO_SHOT_TEMPLATES[1]) == [
        "A Street View photo in Bavaria, Germany.", "A Street View photo in Kenya.", "A Street View photo in Canillo, Andorra."]
    one = [text_prototypes(tiny, gdf, templates=[t]) for t in ZERO_SHOT_TEMPLATES]
    mean = np.mean(one, axis=0)
    want = mean / np.linalg.norm(mean, axis=1, keepdims=True)
    ens = text_prototypes(tiny, gdf, templates=ZERO_SHOT_TEMPLATES)
    assert np.allclose(ens, want, atol=1e-6)
    assert not np.allclose(ens, one[0], atol=1e-3)               # the ensemble is not the first caption
    assert np.allclose(one[0], text_prototypes(tiny, gdf), atol=1e-6)  # the default stays the single caption
    assert len(choose_templates("all")) == len(ZERO_SHOT_TEMPLATES) and choose_templates(2) == ZERO_SHOT_TEMPLATES[:2]


def test_world_bundle_loads_and_locates(world, tiny):
    import pigeon
    from pigeon.bundle import Bundle
    from pigeon.geocells import bundled
    from pigeon.head import PrototypeHead, ZERO_SHOT_TEMPLATES, text_prototypes

    b = Bundle(world)
    assert set(b.manifest["parts"]) == {"cells", "head"}  # no gallery: refinement off; no tuned backbone
    assert b.backbone_spec == "tiny" and b.meta("head")["templates"] == len(ZERO_SHOT_TEMPLATES)
    cells = bundled.world_cells()
    head = PrototypeHead.load(b.part_path("head"))
    assert head.n_cells == len(cells)
    some = np.r_[0:20, len(cells) - 20:len(cells)]  # a sample of cells: the whole ensemble is 8 x 695 captions
    want = text_prototypes(tiny, cells.gdf.iloc[some], templates=ZERO_SHOT_TEMPLATES)
    assert np.allclose(head.prototypes.detach().numpy()[some], want, atol=1e-6)
    p = pigeon.load(world)
    a = p.locate([photo(seed=3)], top_k=3)[0]
    top = a["top_cells"][0]["cell_id"]
    assert a["refinement"]["mode"] == "cell"
    assert (a["lat"], a["lon"]) == pytest.approx(tuple(cells.centres[top]), abs=1e-4)
    probs = [c["probability"] for c in a["top_cells"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6


def test_serve_app_answers_locate(world):
    import pigeon
    from pigeon.api import Settings, create_app

    im = photo(seed=5)
    direct = pigeon.load(world).locate([im], top_k=2)[0]
    with TestClient(create_app(world, Settings())) as client:
        r = client.post("/locate", files={"image": ("p.png", encode(im, "PNG"), "image/png")}, data={"top_k": "2"})
        assert r.status_code == 200, r.text
        a = r.json()
        assert (a["lat"], a["lon"]) == pytest.approx((direct["lat"], direct["lon"]))
        assert a["refinement"]["mode"] == "cell"
        assert client.get("/version").json()["backbone"] == "tiny"


def test_out_refused_unless_force(world, tmp_path, capsys):
    from pigeon.bundle import Bundle

    before = json.loads((world / "manifest.json").read_text())
    assert cli(["world", "--backbone", "tiny", "--out", str(world)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--out {world} is not empty" in err[0] and "--force" in err[0]
    assert json.loads((world / "manifest.json").read_text()) == before
    f = tmp_path / "file"
    f.write_text("x")
    assert cli(["world", "--backbone", "tiny", "--out", str(f)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert cli(["world", "--backbone", "tiny", "--out", str(tmp_path / "n"), "--templates", "0"]) == 2
    assert "--templates" in capsys.readouterr().err and not (tmp_path / "n").exists()
    # --force replaces it, with one template this time; nothing is left beside it
    assert cli(["world", "--backbone", "tiny", "--out", str(world), "--templates", "1", "--force"]) == 0
    assert Bundle(world).meta("head")["templates"] == 1
    assert sorted(p.name for p in world.parent.iterdir()) == [world.name]


def test_pretrained_backbone_goes_into_the_bundle(tmp_path, tiny):
    import pigeon
    from pigeon.backbones import create_backbone
    from pigeon.bundle import Bundle
    from pigeon.core.errors import UserError
    from pigeon.world import build_world

    tuned = create_backbone("tiny")
    with torch.no_grad():
        for prm in tuned.model.parameters():
            prm.add_(0.01)
    tuned.invalidate_hash()
    src = Bundle(tmp_path / "pre", create=True)  # what `pigeon pretrain --out` leaves
    src.write_part("backbone", tuned.save_weights, base_spec="tiny", backbone_hash=tuned.hash)
    src.set_backbone("tiny", tuned.hash)
    rep = build_world(tmp_path / "w", backbone=None, templates=1, pretrained=src.path)
    assert rep["tuned_backbone"] and rep["backbone"] == "tiny"
    b = Bundle(tmp_path / "w")
    assert b.has("backbone") and b.backbone_hash == tuned.hash != tiny.hash
    assert pigeon.load(tmp_path / "w").backbone.hash == tuned.hash
    with pytest.raises(UserError, match="--pretrained .* was tuned from 'tiny', not 'lite'"):
        build_world(tmp_path / "w2", backbone="lite", pretrained=src.path)
    with pytest.raises(UserError, match="does not carry the weights"):
        build_world(tmp_path / "w3", backbone=tiny, pretrained=src.path)


def test_train_zero_shot_takes_the_prompt_ensemble(tmp_path, tiny, capsys):
    import shutil

    import torch

    from api_support import tiny_bundle
    from pigeon.bundle import Bundle
    from pigeon.geocells import GeoCells
    from pigeon.head import ZERO_SHOT_TEMPLATES, PrototypeHead, text_prototypes

    path = tmp_path / "zs"
    shutil.copytree(tiny_bundle(), path)
    assert cli(["train", "--bundle", str(path), "--zero-shot", "--templates", "all"]) == 0
    assert "8 template(s) per cell" in capsys.readouterr().out
    b = Bundle(path)
    assert b.meta("head")["templates"] == len(ZERO_SHOT_TEMPLATES)
    cells = GeoCells.load(b.part_path("cells"))
    head = PrototypeHead.load(b.part_path("head"))
    want = text_prototypes(tiny, cells.gdf, templates=ZERO_SHOT_TEMPLATES)
    np.testing.assert_allclose(torch.nn.functional.normalize(head.prototypes.detach(), dim=-1).numpy(), want, atol=1e-5)
    assert cli(["train", "--bundle", str(path), "--zero-shot", "--templates", "nine"]) == 2
    assert "--templates 'nine': give 'all' or a number from 1 to 8" in capsys.readouterr().err
    assert Bundle(path).meta("head")["templates"] == len(ZERO_SHOT_TEMPLATES)  # the refused call changed nothing
