"""Several views of one place (PIGEON's four-view input): the predictor's combinations, the API and the CLI."""

from __future__ import annotations

import numpy as np
import pytest

from api_support import encode, photo, tiny_predictor
from pigeon.core.errors import UserError
from pigeon.places import COMBINE_MODES, combine_place_probs, mean_view_embeddings, place_codes


def test_mean_view_embeddings_is_renormalised_mean_of_unit_vectors():
    emb = np.array([[3.0, 0.0], [0.0, 0.5], [1.0, 1.0]], np.float32)
    codes, labels = place_codes(["b", "b", "a"])
    assert labels.tolist() == ["a", "b"] and codes.tolist() == [1, 1, 0]
    m = mean_view_embeddings(emb, codes, 2)
    np.testing.assert_allclose(m[1], [np.sqrt(0.5), np.sqrt(0.5)], atol=1e-6)  # (1,0)+(0,1), not (3,0.5)
    np.testing.assert_allclose(np.linalg.norm(m, axis=1), 1.0, atol=1e-6)


def test_product_and_both_combinations():
    views = np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1]], np.float32)
    mean_p = np.array([[0.5, 0.25, 0.25]], np.float32)
    codes = np.zeros(2, np.int64)
    prod = combine_place_probs(views, mean_p, codes, "product")
    want = views[0] * views[1] / (views[0] * views[1]).sum()
    np.testing.assert_allclose(prod[0], want, rtol=1e-5)
    both = combine_place_probs(views, mean_p, codes, "both")
    g = np.sqrt(views[0] * views[1] * mean_p[0])  # the geometric mean of the product and the mean's probs
    want_b = g / g.sum()
    np.testing.assert_allclose(both[0], want_b, rtol=1e-5)
    np.testing.assert_allclose(combine_place_probs(views, mean_p, codes, "mean"), mean_p)


def test_locate_place_one_view_equals_locate():
    pred = tiny_predictor()
    im = photo(seed=3)
    single = pred.locate([im], top_k=3)[0]
    for mode in COMBINE_MODES:
        one = pred.locate_place([im], combine=mode, top_k=3)
        assert one["views"] == 1 and one["combine"] == mode
        assert one["lat"] == pytest.approx(single["lat"]) and one["lon"] == pytest.approx(single["lon"])
        assert one["confidence"] == pytest.approx(single["confidence"], rel=1e-4)
        assert [c["cell_id"] for c in one["top_cells"]] == [c["cell_id"] for c in single["top_cells"]]


def test_locate_place_combines_views():
    pred = tiny_predictor()
    ims = [photo(seed=s) for s in (1, 2, 5, 7)]
    emb = pred.embed(ims)
    view_probs = pred.cell_probs(emb)
    mean = pred.locate_place(embeddings=emb, combine="mean", top_k=8)
    assert mean["views"] == 4 and pred.combine == "mean"  # no recorded mode: PIGEON's mean
    want = pred.cell_probs(mean_view_embeddings(emb, np.zeros(4, np.int64), 1))[0]
    got = {c["cell_id"]: c["probability"] for c in mean["top_cells"]}
    np.testing.assert_allclose([got[i] for i in range(8)], want, rtol=1e-4)
    prod = pred.locate_place(ims, combine="product", top_k=8)
    want_p = np.exp(np.log(view_probs).sum(0))
    want_p /= want_p.sum()
    got_p = {c["cell_id"]: c["probability"] for c in prod["top_cells"]}
    np.testing.assert_allclose([got_p[i] for i in range(8)], want_p, rtol=1e-3)
    assert prod["confidence"] == pytest.approx(want_p.max(), rel=1e-3)


def test_predict_places_groups_views_vectorised():
    pred = tiny_predictor()
    emb = pred.embed([photo(seed=s) for s in range(5)])
    pp = pred.predict_places(emb, ["x", "y", "x", "y", "y"], combine="both")
    p, labels, counts = pp.arrays, pp.labels, pp.views
    assert pp.combine == "both" and pp.codes.tolist() == [0, 1, 0, 1, 1]
    assert labels.tolist() == ["x", "y"] and counts.tolist() == [2, 3]
    alone = pred.locate_place(embeddings=emb[[1, 3, 4]], combine="both")
    assert float(p["lat"][1]) == pytest.approx(alone["lat"]) and float(p["confidence"][1]) == pytest.approx(alone["confidence"], rel=1e-5)


def test_locate_place_bad_input():
    pred = tiny_predictor()
    with pytest.raises(UserError, match="at least one image"):
        pred.locate_place([])
    with pytest.raises(UserError, match="use one of mean, product, both"):
        pred.locate_place([photo()], combine="median")
    with pytest.raises(UserError, match="one place label per view"):
        pred.predict_places(pred.embed([photo()]), ["a", "b"])


# -- POST /locate with several views ------------------------------------------------------------------

@pytest.fixture(scope="module")
def client():
    from fastapi.testclient import TestClient

    from pigeon.api import Settings, create_app

    with TestClient(create_app(tiny_predictor(), Settings(warmup=False))) as c:
        yield c


def _views(client, parts, **form):
    form.setdefault("same_place", "true")
    return client.post("/locate", files=[("image", p) for p in parts], data={k: str(v) for k, v in form.items()})


def test_api_several_views_are_one_place(client):
    ims = [photo(96, 72, seed=1), photo(120, 80, seed=2), photo(64, 64, seed=3)]
    parts = [("a.png", encode(ims[0], "PNG"), "image/png"), ("b.jpg", encode(ims[1]), "image/jpeg"), ("c.webp", encode(ims[2], "WEBP"), "image/webp")]
    r = _views(client, parts, top_k=3, combine="product")
    assert r.status_code == 200, r.text
    a = r.json()
    assert a["views"] == 3 and a["combine"] == "product"
    assert [v["format"] for v in a["view_images"]] == ["png", "jpeg", "webp"]
    assert [(v["width"], v["height"]) for v in a["view_images"]] == [(96, 72), (120, 80), (64, 64)]
    assert a["image"] == a["view_images"][0]
    # the same answer as the predictor on the decoded views (lossless PNG/WebP... and the JPEG as decoded)
    from PIL import Image
    import io
    decoded = [ims[0], Image.open(io.BytesIO(parts[1][1])).convert("RGB"), Image.open(io.BytesIO(parts[2][1])).convert("RGB")]
    direct = tiny_predictor().locate_place(decoded, combine="product", top_k=3)
    assert a["lat"] == pytest.approx(direct["lat"]) and a["confidence"] == pytest.approx(direct["confidence"], rel=1e-4)
    assert [c["cell_id"] for c in a["top_cells"]] == [c["cell_id"] for c in direct["top_cells"]]


def test_api_one_view_unchanged(client):
    r = _views(client, [("x.png", encode(photo(seed=4), "PNG"), "image/png")], top_k=2)
    assert r.status_code == 200 and r.json()["views"] == 1 and r.json()["view_images"] is None


def test_api_bad_views(client):
    png = encode(photo(seed=5), "PNG")
    r = _views(client, [(f"{i}.png", png, "image/png") for i in range(17)])
    assert r.status_code == 422 and r.json()["error"] == "one_image_expected"
    assert "17 `image` parts" in r.json()["detail"] and "2 to 16 views" in r.json()["detail"]
    r = client.post("/locate", data={"top_k": "2"})
    assert r.status_code == 422
    r = _views(client, [("a.png", png, "image/png"), ("b.png", png, "image/png")], same_place="false")
    assert r.status_code == 422 and r.json()["error"] == "one_image_expected" and "without same_place=true" in r.json()["detail"]
    r = _views(client, [("a.png", png, "image/png"), ("b.gif", b"GIF89a" + b"\0" * 40, "image/gif")])
    assert r.status_code == 415 and "image[1] (b.gif)" in r.json()["detail"]
    r = _views(client, [("a.png", png, "image/png"), ("b.png", png, "image/png")], explain="true")
    assert r.status_code == 422 and "explain works on one photo" in r.json()["detail"]
    r = _views(client, [("a.png", png, "image/png"), ("b.png", png, "image/png")], combine="median")
    assert r.status_code == 422


# -- pigeon locate --same-place / --group-by ------------------------------------------------------------

def _cli(args: list[str]) -> int:
    from worlds import cli

    return cli(args)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("views")
    for s in range(5):
        photo(80 + 8 * s, 64, seed=s).save(d / f"v{s}.{'png' if s % 2 else 'jpg'}")
    return d


def test_cli_same_place_one_line(photos, capsys):
    from api_support import tiny_bundle

    files = sorted(photos.glob("v*"))
    assert _cli(["locate", *map(str, files[:4]), "--bundle", str(tiny_bundle()), "--same-place", "--combine", "product"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "4 views (product)" in lines[0]
    direct = tiny_predictor().locate_place(files[:4], combine="product")
    assert lines[0].split("\t")[1] == f"{direct['lat']:.4f}"


def test_cli_group_by_one_answer_per_place(photos, tmp_path, capsys):
    from api_support import tiny_bundle

    m = tmp_path / "m.csv"
    import pandas as pd
    pd.DataFrame({"image": [str(photos / f) for f in ("v0.jpg", "v1.png", "v2.jpg", "v3.png", "v4.jpg")],
                  "location_id": ["a", "a", "b", "b", "b"]}).to_csv(m, index=False)
    out = tmp_path / "r.csv"
    assert _cli(["locate", str(m), "--bundle", str(tiny_bundle()), "--group-by", "location_id", "--out", str(out)]) == 0
    r = pd.read_csv(out)
    assert r["image"].tolist() == ["a", "b"] and r["views"].tolist() == [2, 3]
    direct = tiny_predictor().locate_place([photos / "v2.jpg", photos / "v3.png", photos / "v4.jpg"])
    assert r["lat"][1] == pytest.approx(direct["lat"], abs=1e-6)


@pytest.mark.parametrize("args, needle", [
    (["--same-place", "--group-by", "x"], "give one"),
    (["--combine", "mean"], "add --same-place or --group-by"),
    (["--same-place", "--combine", "median"], "--combine 'median'"),
    (["--group-by", "location_id"], "reads a manifest"),
])
def test_cli_views_bad_options(photos, capsys, args, needle):
    from api_support import tiny_bundle

    assert _cli(["locate", str(photos / "v0.jpg"), "--bundle", str(tiny_bundle()), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_cli_group_by_missing_place(photos, tmp_path, capsys):
    from api_support import tiny_bundle

    m = tmp_path / "m.csv"
    m.write_text(f"image,location_id\n{photos / 'v0.jpg'},a\n{photos / 'v1.png'},\n")
    # one policy (pigeon.places): a photo without a place label is a place of its own
    from pigeon.commands.locate import locate_places

    answers, failures = locate_places([m], tiny_bundle(), group_by="location_id")
    assert not failures and [(a["place"], a["views"]) for a in answers] == [("<row 1>", 1), ("a", 1)]
    assert _cli(["locate", str(m), "--bundle", str(tiny_bundle()), "--group-by", "place"]) == 2
    assert "lacks column(s) place" in capsys.readouterr().err


def test_api_batch_groups_by_place(client):
    ims = [photo(seed=s) for s in range(4)]
    files = [("images", (f"{i}.png", encode(im, "PNG"), "image/png")) for i, im in enumerate(ims)]
    files.append(("images", ("bad.gif", b"GIF89a" + b"\0" * 40, "image/gif")))
    r = client.post("/locate/batch", files=files, data={"place": ["north", "south", "north", "south", "east"], "combine": "mean", "top_k": "2"})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [e["place"] for e in res] == ["north", "south", "east"]
    assert res[0]["filenames"] == ["0.png", "2.png"] and res[0]["result"]["views"] == 2
    assert res[2]["error"]["status"] == 415 and "bad.gif" in res[2]["error"]["detail"]
    direct = tiny_predictor().locate_place([ims[1], ims[3]], combine="mean", top_k=2)
    assert res[1]["result"]["lat"] == pytest.approx(direct["lat"]) and res[1]["result"]["confidence"] == pytest.approx(direct["confidence"], rel=1e-4)


def test_api_batch_place_on_some_entries(client):
    png = encode(photo(seed=1), "PNG")
    files = [("images", (f"{i}.png", png, "image/png")) for i in range(3)]
    r = client.post("/locate/batch", files=files, data={"place": ["a", "b"]})
    assert r.status_code == 422 and "`place` given for 2 of 3 images" in r.json()["detail"]
    r = client.post("/locate/batch", files=files, data={"place": ["a", " ", "b"]})   # no label: a place of its own
    assert r.status_code == 200 and [e["place"] for e in r.json()["results"]] == ["a", "<row 1>", "b"]
    # 16 images, each with a place: within the form's field limit
    files16 = [("images", (f"{i}.png", png, "image/png")) for i in range(16)]
    r = client.post("/locate/batch", files=files16, data={"place": [str(i % 4) for i in range(16)], "top_k": "1", "combine": "both"})
    assert r.status_code == 200 and [e["result"]["views"] for e in r.json()["results"]] == [4, 4, 4, 4]


# -- pigeon evaluate --group-by -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from worlds import world_bundle

    root = tmp_path_factory.mktemp("evalviews")
    manifest, df, bundle, _ = world_bundle(root, n_images=60, image_size=48, seed=12, min_size=8, max_size=16)
    df["location_id"] = [f"L{i // 3}" for i in range(len(df))]  # three photos per "place" (their truths differ: the mean is the place's)
    df.to_csv(manifest, index=False)
    return manifest, df, bundle, root


def test_evaluate_group_by_scores_places(world):
    from pigeon.evaluate import evaluate
    from pigeon.predictor import Predictor

    manifest, df, bundle, root = world
    m = evaluate(bundle, manifest, split=None, cache_dir=str(root / "cache"), progress=False, plots=False,
                 group_by="location_id", combine="product")
    pp = m["per_place"]
    assert pp["n_places"] == 20 and pp["views_per_place_max"] == 3 and pp["combine"] == "product" and m["n"] == 60
    # the same figures by hand: predict_places on the photos' embeddings, truths the places' spherical means
    from pigeon.core.sphere import haversine_km, spherical_mean
    pred = Predictor.from_bundle(bundle)
    emb = pred.embed([root / "world" / f for f in df["image"]])
    placed = pred.predict_places(emb, df["location_id"].to_numpy(), combine="product", top_k=1)
    p, labels = placed.arrays, placed.labels
    truths = np.array([spherical_mean(g["lat"].to_numpy(), g["lon"].to_numpy()) for _, g in df.groupby("location_id")])
    km = haversine_km(p["lat"], p["lon"], truths[:, 0], truths[:, 1])
    assert pp["median_km"] == pytest.approx(float(np.median(km)), rel=1e-3)


def test_evaluate_group_by_one_photo_per_place_is_per_photo(world):
    from pigeon.evaluate import evaluate

    manifest, df, bundle, root = world
    df = df.assign(location_id=[f"p{i}" for i in range(len(df))])
    one = manifest.parent / "one.csv"
    df.to_csv(one, index=False)
    m = evaluate(bundle, one, split=None, cache_dir=str(root / "cache"), progress=False, plots=False, group_by="location_id")
    assert m["per_place"]["n_places"] == 60 and m["per_place"]["combine"] == "mean"
    assert m["per_place"]["median_km"] == pytest.approx(m["median_km"], rel=1e-4)


def test_evaluate_group_by_bad_input(world):
    from pigeon.evaluate import evaluate

    manifest, df, bundle, root = world
    with pytest.raises(UserError, match="has no column 'place'"):
        evaluate(bundle, manifest, split=None, cache_dir=str(root / "cache"), progress=False, plots=False, group_by="place")
    with pytest.raises(UserError, match="add --group-by"):
        evaluate(bundle, manifest, split=None, cache_dir=str(root / "cache"), progress=False, plots=False, combine="mean")
    holes = manifest.parent / "holes.csv"
    df.assign(location_id=["L1", ""] + ["L2"] * (len(df) - 2)).to_csv(holes, index=False)
    # one policy (pigeon.places): the row without a place is a place of its own
    m = evaluate(bundle, holes, split=None, cache_dir=str(root / "cache"), progress=False, plots=False, group_by="location_id")
    assert (m["per_place"]["n_places"], m["per_place"]["views_per_place_max"]) == (3, 58)


def test_recorded_combine_mode_is_the_default(tmp_path):
    import shutil

    from api_support import tiny_bundle
    from pigeon.bundle import Bundle
    from pigeon.predictor import Predictor

    path = tmp_path / "b"
    shutil.copytree(tiny_bundle(), path)
    b = Bundle(path)
    b.manifest["parts"]["head"]["combine_mode"] = "product"
    b.save_manifest()
    pred = Predictor.from_bundle(path)
    ims = [photo(seed=s) for s in (1, 2)]
    assert pred.combine == "product" and pred.locate_place(ims)["combine"] == "product"
    assert pred.locate_place(ims)["confidence"] == pytest.approx(pred.locate_place(ims, combine="product")["confidence"])
    b.manifest["parts"]["head"]["combine_mode"] = "median"
    b.save_manifest()
    with pytest.raises(UserError, match="combine_mode 'median'"):
        Predictor.from_bundle(path)


# -- training with grouped views: splits by place, the view combination chosen on val places ------------

def test_auto_val_split_keeps_places_whole():
    from pigeon.train import TrainConfig, _splits

    groups = np.array([f"P{i // 4}" for i in range(200)], dtype=object)  # 50 places x 4 views
    split = np.array(["train"] * 200)
    tr, va = _splits(split, TrainConfig(seed=3), groups, "location_id")
    assert len(tr) + len(va) == 200 and len(va) == 20  # a tenth of the places, all four views of each
    assert not set(groups[tr]) & set(groups[va])
    tr2, va2 = _splits(split, TrainConfig(seed=3), groups, "location_id")
    assert va.tolist() == va2.tolist()  # seeded
    _, va_photo = _splits(split, TrainConfig(seed=3))  # no groups: photos drawn one by one
    assert set(groups[va_photo]) & set(groups[np.setdiff1d(np.arange(200), va_photo)])


def test_given_splits_must_not_cut_a_place():
    from pigeon.train import TrainConfig, _splits

    groups = np.array(["A", "A", "B", "B", "C", "C"], dtype=object)
    split = np.array(["train", "train", "train", "test", "val", "val"])
    with pytest.raises(UserError, match=r"1 places \(location_id\) have photos in more than one split, e.g. 'B' in test and train"):
        _splits(split, TrainConfig(), groups, "location_id")
    tr, va = _splits(np.array(["train", "train", "test", "test", "val", "val"]), TrainConfig(), groups, "location_id")
    assert tr.tolist() == [0, 1] and va.tolist() == [4, 5]


def test_place_groups_options():
    import pandas as pd

    from pigeon.train import place_groups

    rows = pd.DataFrame({"key": ["a", "b", "c"], "location_id": ["L1", "nan", "L1"], "site": ["x", "y", "y"]})
    labels, col = place_groups(rows, "auto")
    assert col == "location_id" and labels[0] == labels[2] and labels[1] not in (labels[0], "nan")  # no label: a place of its own
    assert place_groups(rows, "none") == (None, None)
    assert place_groups(rows.drop(columns="location_id"), "auto") == (None, None)
    assert place_groups(rows, "site")[0].tolist() == ["x", "y", "y"]
    with pytest.raises(UserError, match="--group-by place: the training data has no column .place."):
        place_groups(rows, "place")


def test_auto_tau_follows_cell_spacing():
    from pigeon.head import DEFAULT_TAU_KM, auto_tau_km
    from pigeon.core.sphere import haversine_km

    centres = np.array([[0.0, 0.0], [0.0, 1.0], [0.0, 3.0], [10.0, 3.0]])
    one_deg = float(haversine_km(0.0, 0.0, 0.0, 1.0))
    # nearest neighbours: 1 deg, 1 deg, 2 deg, 10 deg of latitude -> median 1.5 deg along the equator, halved
    assert auto_tau_km(centres) == pytest.approx(0.5 * 1.5 * one_deg, rel=1e-4)
    assert auto_tau_km(centres[:1]) == DEFAULT_TAU_KM


@pytest.fixture(scope="module")
def grouped_training(tmp_path_factory):
    from worlds import world_bundle
    from pigeon.train import TrainConfig, train

    root = tmp_path_factory.mktemp("grouped")
    manifest, df, bundle, _ = world_bundle(root, n_images=240, image_size=48, seed=14, min_size=8, max_size=20, zero_shot=False)
    df["location_id"] = [f"L{i // 3}" for i in range(len(df))]  # 80 "places" of three photos
    df["split"] = "train"
    df.to_csv(manifest, index=False)
    rep = train(manifest, bundle, backbone="tiny", config=TrainConfig(epochs=8, seed=1, cache_dir=str(root / "cache"), progress=False))
    return manifest, df, bundle, root, rep


def test_training_chooses_and_records_the_view_combination(grouped_training):
    from pigeon.bundle import Bundle
    from pigeon.core.sphere import haversine_km, spherical_mean
    from pigeon.datasets import open_source
    from pigeon.embed import cached_embeddings
    from pigeon.geocells import GeoCells
    from pigeon.head import auto_tau_km
    from pigeon.predictor import Predictor

    manifest, df, bundle, root, rep = grouped_training
    cv = rep["combine_validation"]
    assert rep["n_val"] == 24 and cv["places"] == 8 and cv["views"] == 24 and cv["group_by"] == "location_id"
    assert set(cv["median_km"]) == set(COMBINE_MODES) and rep["combine_mode"] in COMBINE_MODES
    best = min(cv["median_km"].values())
    if rep["combine_mode"] != "mean":  # leaving PIGEON's mean needs the lowest median, beyond bootstrap noise
        assert cv["median_km"][rep["combine_mode"]] == best and cv["beats_mean_share"][rep["combine_mode"]] >= 0.95
    else:
        assert all(share < 0.95 for share in cv["beats_mean_share"].values())
    b = Bundle(bundle)
    assert b.meta("head")["combine_mode"] == rep["combine_mode"]
    pred = Predictor.from_bundle(bundle)
    assert pred.combine == rep["combine_mode"]
    # the same medians by hand: the val places' views through predict_places (no gallery: top cells' centres)
    store, _ = cached_embeddings(open_source(manifest), pred.backbone, root / "cache", progress=False)
    rows = store.rows
    val_places = sorted(set(rows["location_id"]) - set(_train_places(rows, store, b, pred)))
    sel = np.flatnonzero(rows["location_id"].isin(val_places).to_numpy())
    assert len(sel) == 24
    for mode in COMBINE_MODES:
        placed = pred.predict_places(store.take(sel), rows["location_id"].to_numpy()[sel], combine=mode)
        p, labels = placed.arrays, placed.labels
        # a place's three photos have their own truths here: the place's truth is their spherical mean
        truths = np.array([spherical_mean(g["lat"].to_numpy(), g["lon"].to_numpy()) for _, g in rows.iloc[sel].groupby("location_id")])
        km = haversine_km(p["lat"], p["lon"], truths[:, 0], truths[:, 1])
        assert float(np.median(km)) == pytest.approx(cv["median_km"][mode], rel=1e-6)
    assert rep["tau_km"] == pytest.approx(auto_tau_km(GeoCells.load(b.part_path("cells")).centres)) and rep["tau_source"].startswith("auto")
    assert float(b.meta("head")["tau_km"]) == pytest.approx(rep["tau_km"])


def _train_places(rows, store, b, pred):
    """The places the head was trained on: the val draw is seeded, so redo it."""
    from pigeon.train import TrainConfig, _splits, place_groups

    groups, col = place_groups(rows, "auto")
    tr, _ = _splits(rows["split"].to_numpy(), TrainConfig(seed=1), groups, col)
    return rows["location_id"].to_numpy()[tr]


def test_training_refuses_a_place_cut_in_two(grouped_training, tmp_path):
    from pigeon.train import TrainConfig, train

    manifest, df, bundle, root, _ = grouped_training
    bad = manifest.parent / "cut.csv"
    df.assign(split=["train", "val", "train"] * (len(df) // 3)).to_csv(bad, index=False)
    with pytest.raises(UserError, match="80 places \\(location_id\\) have photos in more than one split"):
        train(bad, bundle, config=TrainConfig(epochs=1, cache_dir=str(root / "cache"), progress=False))
    rep = train(bad, bundle, config=TrainConfig(epochs=1, group_by="none", cache_dir=str(root / "cache"), progress=False))
    assert "combine_mode" not in rep and rep["n_val"] == 80


def test_evaluate_reports_plain_retrieval(tmp_path):
    from worlds import gallery_bundle
    from pigeon.evaluate import evaluate

    bundle = gallery_bundle(tmp_path, seed=15)
    manifest = tmp_path / "world" / "manifest.csv"
    # photos of the gallery itself: the nearest gallery photo is the photo, so retrieval is exact
    own = evaluate(bundle, manifest, split="train", progress=False, plots=False, allow_gallery_overlap=True)
    assert own["baseline_retrieval"]["median_km"] == pytest.approx(0.0, abs=1e-6) and own["baseline_retrieval"]["within_1km"] == 1.0
    import pandas as pd

    alone = manifest.parent / "alone.csv"
    pd.read_csv(manifest).pipe(lambda d: d.assign(location_id=d["image"])).to_csv(alone, index=False)
    held = evaluate(bundle, alone, split="test", progress=False, plots=False, group_by="location_id")
    r = held["baseline_retrieval"]
    assert r["median_km"] > 1.0 and set(r) == {"median_km"} | {k for k in held if k.startswith("within_")}
    # one photo per place: the per-place retrieval is the per-photo one
    assert held["per_place"]["baseline_retrieval"]["median_km"] == pytest.approx(r["median_km"], rel=1e-6)


def test_cli_same_place_refuses_what_looks_like_several_places(photos, tmp_path, capsys):
    import shutil

    import pandas as pd

    from api_support import tiny_bundle

    mixed = tmp_path / "mixed"
    for place, names in (("harbour", ("v0.jpg", "v1.png")), ("square", ("v2.jpg", "v3.png"))):
        (mixed / place).mkdir(parents=True)
        for n in names:
            shutil.copy(photos / n, mixed / place / n)
    m = tmp_path / "m.csv"
    pd.DataFrame({"image": [str(photos / "v0.jpg"), str(photos / "v2.jpg")], "location_id": ["a", "b"]}).to_csv(m, index=False)
    for inputs, needle in (([mixed], "holds images in 2 folders (harbour, square)"), ([m], "not a manifest")):
        assert _cli(["locate", *map(str, inputs), "--bundle", str(tiny_bundle()), "--same-place"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    # one place's folder (even with views of several formats and sizes) is one answer
    assert _cli(["locate", str(mixed / "harbour"), "--bundle", str(tiny_bundle()), "--same-place"]) == 0
    assert "2 views (mean)" in capsys.readouterr().out
