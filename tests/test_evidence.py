"""Evidence (issue 18, item 1): the gallery photos that decided an answer's refinement, with the source columns
(url, source, license, author) that build-index keeps from the manifest; in the Predictor, the API and `pigeon locate`.
Answers asked without it do not change."""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from pigeon.api import Settings, create_app
from pigeon.core.sphere import haversine_km
from pigeon.index import RefineConfig
from pigeon.predictor import AnswerOptions, Predictor

torch.set_num_threads(2)
EVIDENCE = AnswerOptions(evidence=True)
SOURCE = ("url", "source", "license", "author")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A gallery bundle built from a manifest with url/author/license/source columns; its predictor; the manifest by key."""
    from worlds import gallery_bundle

    root = tmp_path_factory.mktemp("evidence")
    bundle = gallery_bundle(root, seed=23, source_columns=True)
    manifest = pd.read_csv(root / "world" / "manifest.csv", keep_default_na=False)
    # PIGEON's 1000 km guard off: this toy world's cells span continents, and the guard would send most answers
    # back to their top cell's centre (no evidence; tested below with the guard on)
    pred = Predictor.from_bundle(bundle, refine=RefineConfig(max_refinement_km=math.inf))
    held = [root / "world" / i for i in manifest.loc[manifest["split"] != "train", "image"]]   # photos the gallery lacks
    return {"root": root, "bundle": bundle, "pred": pred, "manifest": manifest.set_index("image"), "held": held, "images": held[:4]}


def _emb(world):
    return world["pred"].embed([str(p) for p in world["images"]])


def _check_entries(answer: dict, manifest: pd.DataFrame, pred: Predictor) -> None:
    """Every evidence entry against the manifest row of its key, the answer point and the refinement's neighbours."""
    ev = answer["evidence"]
    nbs = answer["refinement"]["neighbours"]
    assert [e["key"] for e in ev] == [n["image"] for n in nbs] and [e["id"] for e in ev] == [n["id"] for n in nbs]
    sims = [e["similarity"] for e in ev]
    assert sims == sorted(sims, reverse=True) and sims == pytest.approx([n["similarity"] for n in nbs])
    for e in ev:
        row = manifest.loc[e["key"]]
        assert row["split"] == "train"                       # the gallery holds train photos only
        assert (e["lat"], e["lon"]) == pytest.approx((row["lat"], row["lon"]))
        assert e["distance_km"] == pytest.approx(float(haversine_km(e["lat"], e["lon"], answer["lat"], answer["lon"])), abs=1e-6)
        assert e["cell"] == int(pred.cells.cell_of(np.array([row["lat"]]), np.array([row["lon"]]))[0])
        for c in SOURCE:
            if row[c] == "":
                assert c not in e, (e["key"], c)               # the manifest left it blank: absent, not ""
            else:
                assert e[c] == str(row[c]), (e["key"], c)


def test_build_index_keeps_the_manifest_source_columns(world):
    from pigeon.bundle import Bundle
    from pigeon.index import gallery_keys, read_gallery_frame

    frame = read_gallery_frame(Bundle(world["bundle"]).part_path("gallery"))
    man = world["manifest"]
    assert set(SOURCE) <= set(frame.columns) and len(frame) == (man["split"] == "train").sum()
    for c in SOURCE:
        want = man.loc[frame["image"], c].replace("", None).tolist()
        assert frame[c].astype(object).where(frame[c].notna(), None).tolist() == want, c
    assert frame["url"].isna().sum() == (man.loc[frame["image"], "url"] == "").sum() > 0
    assert list(gallery_keys(frame["id"].to_numpy(), frame["image"].to_numpy(object))) == frame["image"].tolist()
    assert list(gallery_keys(np.array([4, 5]), np.array(["", "a.jpg"], object))) == ["4", "a.jpg"]


def test_evidence_lists_the_refinement_neighbours_with_their_source_columns(world):
    pred = world["pred"]
    answers = pred.locate(world["held"], options=EVIDENCE)
    assert {a["refinement"]["mode"] for a in answers} == {"cluster+nn"}
    for a in answers:
        assert len(a["evidence"]) == pred.refine.neighbours == 5
        _check_entries(a, world["manifest"], pred)
    seen = {c for a in answers for e in a["evidence"] for c in SOURCE if c in e}
    assert seen == set(SOURCE)


def test_answers_without_the_flag_are_unchanged(world):
    pred = world["pred"]
    emb = _emb(world)
    p = pred.predict_embeddings(emb)
    before = pred.format(p)
    assert before == pred.format(p, options=AnswerOptions()) == pred.format(pred.predict_embeddings(emb, options=AnswerOptions()))
    with_ev = pred.format(pred.predict_embeddings(emb, options=EVIDENCE), options=EVIDENCE)
    assert all("evidence" not in a for a in before)
    assert [{k: v for k, v in a.items() if k != "evidence"} for a in with_ev] == before
    # places too: one answer for several views, its evidence from the places' mean embedding
    groups = np.zeros(len(emb), np.int64)
    plain = pred.format_places(pred.predict_places(emb, groups))
    asked = pred.format_places(pred.predict_places(emb, groups, options=EVIDENCE), options=EVIDENCE)
    assert [{k: v for k, v in a.items() if k != "evidence"} for a in asked] == plain and "evidence" not in plain[0]
    _check_entries(asked[0], world["manifest"], pred)


@pytest.mark.parametrize("mode", ["none", "cluster"])
def test_evidence_is_empty_when_no_gallery_photo_decided(world, mode):
    pred = copy.copy(world["pred"])
    pred.refine = dataclasses.replace(pred.refine, mode=mode)
    answers = pred.format(pred.predict_embeddings(_emb(world), options=EVIDENCE), options=EVIDENCE)
    assert [a["evidence"] for a in answers] == [[]] * len(answers)
    assert {a["refinement"]["mode"] for a in answers} == {"cell" if mode == "none" else "cluster"}


def test_evidence_is_empty_where_the_guard_undid_the_refinement(world):
    pred = copy.copy(world["pred"])
    pred.refine = dataclasses.replace(pred.refine, max_refinement_km=1000.0)   # PIGEON's guard
    answers = pred.locate(world["held"], options=EVIDENCE)
    modes = [a["refinement"]["mode"] for a in answers]
    assert "cell" in modes
    for a in answers:
        assert len(a["evidence"]) == (5 if a["refinement"]["mode"] == "cluster+nn" else 0)
        _check_entries(a, world["manifest"], pred)


def test_evidence_without_a_gallery_is_empty():
    from api_support import photo, tiny_predictor

    a = tiny_predictor().locate([photo(seed=3)], options=EVIDENCE)[0]
    assert a["evidence"] == [] and a["refinement"]["mode"] == "cell"


def test_galleries_without_source_columns_load_and_give_evidence_without_them(tmp_path):
    """A gallery written before the source columns were kept (or from a source without them) loads as before;
    an append that brings them leaves the old photos without."""
    from pigeon.index import GALLERY_COLUMNS, GalleryRefiner, append_gallery, build_gallery, read_gallery_frame, write_gallery_frame
    from pigeon.index.refine import RefineConfig

    rng = np.random.default_rng(0)
    n, d = 60, 16
    emb = rng.normal(size=(n, d)).astype(np.float32)
    lat, lon = rng.uniform(40, 50, n), rng.uniform(0, 10, n)
    cell = (lon > 5).astype(np.int64)
    g = build_gallery(emb, np.arange(n), lat, lon, cell, np.array([f"p{i}.jpg" for i in range(n)]))
    write_gallery_frame(g.frame, tmp_path / "old.parquet")
    old = read_gallery_frame(tmp_path / "old.parquet")
    assert list(old.columns) == GALLERY_COLUMNS
    g.frame = old
    centres = np.array([[45.0, 2.5], [45.0, 7.5]])
    r = GalleryRefiner(g, centres)
    assert r.source_columns == ()
    res = r.answer(emb[:3], np.tile([0.9, 0.1], (3, 1)), RefineConfig(mode="nn"))
    cols = r.neighbour_columns(res)
    assert set(cols) == {"key", "lat", "lon", "cell", "image"} and cols["key"][0, 0] == "p0.jpg"

    src = pd.DataFrame({"url": [f"https://x/{i}" for i in range(10)], "license": ["CC0"] * 9 + [None]})
    g2 = append_gallery(g, rng.normal(size=(10, d)).astype(np.float32), np.arange(n, n + 10), lat[:10], lon[:10], cell[:10],
                        np.array([f"q{i}.jpg" for i in range(10)]), source=src)
    write_gallery_frame(g2.frame, tmp_path / "new.parquet")
    new = read_gallery_frame(tmp_path / "new.parquet")
    assert list(new.columns) == GALLERY_COLUMNS + ["url", "license"] and str(new["url"].dtype) == "string"
    assert new["url"].isna().sum() == n and new.loc[new["id"] == n + 3, "url"].item() == "https://x/3"
    assert new["license"].isna().sum() == n + 1


def test_webdataset_and_parquet_sources_carry_the_columns_to_the_embedding_rows(tmp_path):
    """img2dataset's `url` in each sample's .json, and source columns of an image-Parquet file, reach the
    records and `pigeon embed`'s rows; a manifest's fingerprint follows them."""
    from pigeon.datasets import open_source
    from pigeon.datasets.manifest import read_manifest
    from pigeon.datasets.shards import write_image_parquet, write_webdataset
    from pigeon.datasets.sources import ManifestSource
    from pigeon.datasets.synthetic import make_world
    from pigeon.embed import _rows_frame
    from worlds import with_source_columns

    manifest = make_world(tmp_path / "w", n_images=12, image_size=32, seed=2)
    df = read_manifest(manifest)
    df = with_source_columns(df)
    df["key"] = [f"k{i:02d}" for i in range(len(df))]
    shards = df.drop(columns=["url"])   # the writers keep each photo's `image` as `url`, as img2dataset keeps its source
    for src in (open_source(write_webdataset(shards, tmp_path / "wds")[0]), open_source(write_image_parquet(shards, tmp_path / "pq")[0])):
        recs = [r for i in range(len(src.shards)) for r in src.records(i)]
        rows = _rows_frame(np.arange(len(recs)), recs)
        by_key = df.set_index("key")
        assert len(rows) == len(df), src.kind
        for c, want in (("author", "author"), ("license", "license"), ("source", "source"), ("url", "image")):
            assert rows[c].tolist() == by_key.loc[rows["key"], want].tolist(), (src.kind, c)
        assert "url" not in src.coords().columns, src.kind   # coords() stays the cells' input

    fresh = tmp_path / "m.csv"
    df.drop(columns=["key", "path"]).to_csv(fresh, index=False)
    fp = ManifestSource(str(fresh)).fingerprint(0)
    changed = df.drop(columns=["key", "path"]).assign(license="CC-BY-SA-4.0")
    changed.to_csv(fresh, index=False)
    assert ManifestSource(str(fresh)).fingerprint(0) != fp       # a cached embedding of it is made again, with the new values


# -- the API --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(world):
    with TestClient(create_app(world["pred"], Settings(warmup=False))) as c:
        yield c


def _png(path) -> bytes:
    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def test_api_locate_with_evidence(client, world):
    data = _png(world["images"][0])
    r = client.post("/locate", files={"image": ("a.png", data, "image/png")}, data={"evidence": "true"})
    assert r.status_code == 200, r.text
    a = r.json()
    want = world["pred"].locate([Image.open(io.BytesIO(data)).convert("RGB")], options=EVIDENCE)[0]
    assert [e["key"] for e in a["evidence"]] == [e["key"] for e in want["evidence"]] and len(a["evidence"]) == 5
    for got, exp in zip(a["evidence"], want["evidence"]):
        assert got == {**exp, "similarity": pytest.approx(exp["similarity"], abs=1e-5), "distance_km": pytest.approx(exp["distance_km"], abs=1e-3)}
    _check_entries(a, world["manifest"], world["pred"])
    plain = client.post("/locate", files={"image": ("a.png", data, "image/png")})
    assert plain.status_code == 200 and "evidence" not in plain.json()
    off = client.post("/locate", files={"image": ("a.png", data, "image/png")}, data={"evidence": "false"}).json()
    strip = lambda j: {k: v for k, v in j.items() if k not in ("timings_ms", "evidence")}  # noqa: E731
    assert strip(off) == strip(plain.json()) == strip(a)


def test_api_batch_with_evidence(client, world):
    files = [("images", (p.name, _png(p), "image/png")) for p in world["images"][:3]]
    r = client.post("/locate/batch", files=files, data={"evidence": "true"})
    assert r.status_code == 200, r.text
    results = [item["result"] for item in r.json()["results"]]
    assert len(results) == 3 and all(len(a["evidence"]) == 5 for a in results)
    for a in results:
        _check_entries(a, world["manifest"], world["pred"])
    places = client.post("/locate/batch", files=files, data={"evidence": "true", "place": ["x", "x", "y"]}).json()["results"]
    assert [len(p["result"]["evidence"]) for p in places] == [5, 5]
    plain = client.post("/locate/batch", files=files).json()["results"]
    assert all("evidence" not in item["result"] for item in plain)


def test_openapi_documents_the_evidence_field_and_entries(client):
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    entry = schemas["EvidencePhoto"]["properties"]
    assert {"key", "id", "lat", "lon", "similarity", "distance_km", "cell", *SOURCE} <= set(entry)
    assert schemas["Location"]["properties"]["evidence"]["anyOf"][0]["items"]["$ref"].endswith("/EvidencePhoto")
    for path in ("/locate", "/locate/batch"):
        ref = spec["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[1]
        field = schemas[ref]["properties"]["evidence"]
        assert field["default"] is False and "gallery photos" in field["description"]


# -- the CLI --------------------------------------------------------------------------------------
def test_cli_locate_evidence(world, tmp_path, capsys):
    from worlds import cli

    imgs = [str(p) for p in world["images"][:2]]
    base = ["locate", *imgs, "--bundle", str(world["bundle"]), "--max-refinement-km", "inf"]   # as the fixture's predictor
    assert cli(base) == 0
    plain = capsys.readouterr().out.strip().splitlines()
    assert cli(base + ["--evidence"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    want = world["pred"].locate(imgs, options=EVIDENCE)
    assert len(lines) == len(plain) == 2 and all("\tevidence:" not in line for line in plain)
    for line, before, a in zip(lines, plain, want):
        best = a["evidence"][0]
        assert line == before + f"\tevidence: 5 photos, best {best['similarity']:.2f} ({best['key']}, {best['distance_km']:.0f} km)"

    out = tmp_path / "r.geojson"
    assert cli(base + ["--evidence", "--out", str(out)]) == 0
    feats = [f for f in json.loads(out.read_text())["features"] if f["properties"]["kind"] == "answer"]
    for f, a in zip(feats, want):
        ev = f["properties"]["evidence"]
        assert [e["key"] for e in ev] == [e["key"] for e in a["evidence"]]
        _check_entries({**f["properties"], "lat": f["geometry"]["coordinates"][1], "lon": f["geometry"]["coordinates"][0]},
                       world["manifest"], world["pred"])
    csv = tmp_path / "r.csv"
    assert cli(base + ["--evidence", "--out", str(csv)]) == 0
    table = pd.read_csv(csv)
    assert table["evidence_photos"].tolist() == [5, 5]
    assert table["evidence_best_key"].tolist() == [a["evidence"][0]["key"] for a in want]
    assert cli(base + ["--out", str(csv)]) == 0
    assert not any(c.startswith("evidence") for c in pd.read_csv(csv).columns)
    capsys.readouterr()
