"""Each rule has one owner, and every command that applies the rule goes through it:
- the head's fit to the bundle (`pigeon.loading.check_head`): serve, locate, evaluate and build-index
  refuse (or set aside) a head for other cells with the same words;
- choices made on validation photos (`pigeon.metrics.choose_on_validation`);
- plain retrieval, the baseline (`Gallery.nearest`);
- gallery ids (`pigeon.index.gallery.check_new_ids`) and refinement options (`RefineConfig`), named
  as the user set them (`FieldError`: the CLI's flag, the service's setting and variable);
- a photo without a place label is a place of its own (`pigeon.places.place_labels`).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from pigeon.core.errors import FieldError, UserError
from worlds import cli


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    from worlds import gallery_bundle

    return gallery_bundle(tmp_path_factory.mktemp("owners"), seed=6)


@pytest.fixture(scope="module")
def misfit(source, tmp_path_factory):
    """The gallery bundle with a head of one prototype too many (trained, as it were, on other cells)."""
    from pigeon.bundle import Bundle
    from pigeon.head import PrototypeHead, write_head

    dst = tmp_path_factory.mktemp("misfit") / "b"
    shutil.copytree(source, dst)
    b = Bundle(dst)
    head = PrototypeHead.load(b.part_path("head"))
    protos = head.prototypes.detach().numpy()
    write_head(b, PrototypeHead(np.vstack([protos, protos[:1]])), b.backbone_hash)
    return dst, len(protos)


def test_a_misfit_head_is_refused_alike_by_every_command(source, misfit, tmp_path, capsys):
    from pigeon.api import Settings, create_app
    from pigeon.indexing import build_index
    from pigeon.predictor import Predictor

    bundle, n = misfit
    why = f"head.safetensors has {n + 1} prototypes but the bundle has {n} cells"
    with pytest.raises(UserError, match=f"{why}; retrain it with `pigeon train`"):
        Predictor.from_bundle(bundle)
    with pytest.raises(UserError, match=why):
        create_app(bundle, Settings(warmup=False))
    manifest = source.parent / "world" / "manifest.csv"
    for args in (["locate", str(next((manifest.parent / "images").iterdir())), "--bundle", str(bundle)],
                 ["evaluate", "--bundle", str(bundle), "--data", str(manifest), "--split", "val", "--cache-dir", str(tmp_path / "c")]):
        assert cli(args) == 2
        assert why in capsys.readouterr().err
    # build-index only needs the head to choose the refinement mode: it says why it cannot
    with pytest.raises(UserError, match=f"cannot validate refinement: {why}"):
        build_index(manifest, bundle, progress=False, validate=True, cache_dir=str(tmp_path / "c"))


def test_choose_on_validation_keeps_the_default_unless_beaten_beyond_noise():
    from pigeon.metrics import choose_on_validation

    rng = np.random.default_rng(0)
    base = rng.uniform(10, 100, 60)
    other = base * rng.uniform(0.5, 1.5, 60)
    other += np.median(base) - np.median(other) - 0.1   # a median lower by a hair, and noisy
    noisy = {"mean": base, "product": other}
    c = choose_on_validation(noisy, "mean", seed=0)
    assert c["median_km"]["product"] < c["median_km"]["mean"] and c["choice"] == "mean"
    assert 0 < c["beats_default_share"]["product"] < 0.95
    clear = {"mean": base, "product": base * 0.5}
    assert choose_on_validation(clear, "mean", seed=0)["choice"] == "product"
    tie = {"a": base, "b": base.copy()}
    assert choose_on_validation(tie, "b", order=("b", "a"))["choice"] == "b"   # ties go first in `order`


def test_plain_retrieval_answers_a_gallery_photo_with_its_own_position(source):
    from pigeon.predictor import Predictor

    pred = Predictor.from_bundle(source)
    g = pred.gallery.gallery
    ids, vecs = g.index.vectors()
    lat, lon, got = g.nearest(np.asarray(vecs[:5], np.float32))
    frame = g.frame.set_index("id").loc[ids[:5]]
    assert got.tolist() == ids[:5].tolist()
    np.testing.assert_allclose(lat, frame["lat"].to_numpy())
    np.testing.assert_allclose(lon, frame["lon"].to_numpy())


def test_gallery_ids_are_checked_once_where_they_enter():
    from pigeon.index import GeoIndex
    from pigeon.index.gallery import check_new_ids

    assert check_new_ids([3, 1, 2]).dtype == np.int64
    with pytest.raises(UserError, match="gallery ids must be unique"):
        check_new_ids([1, 1])
    with pytest.raises(UserError, match="not already in the index"):
        check_new_ids([4, 5], existing=np.array([5]))
    g = GeoIndex(4)
    g.add(np.eye(4, dtype=np.float32)[:2], np.array([7, 8]))
    with pytest.raises(UserError, match="not already in the index"):
        g.add(np.eye(4, dtype=np.float32)[2:3], np.array([8]))


@pytest.mark.parametrize("options, field", [
    (dict(mode="nearest"), "mode"), (dict(max_refinement_km=-1), "max_refinement_km"),
    (dict(temperature=0), "temperature"), (dict(neighbours=0), "neighbours"),
])
def test_refinement_options_are_checked_once_and_named_by_field(options, field):
    from pigeon.index import RefineConfig, Refiner

    with pytest.raises(FieldError) as e:
        RefineConfig(**options)
    assert e.value.field == field and "--" not in str(e.value) and "PIGEON_" not in str(e.value)
    # the low-level refine() takes loose options: they go through the same checks
    with pytest.raises(FieldError) as e2:
        Refiner.refine(object.__new__(Refiner), np.zeros((1, 4), np.float32), np.ones((1, 2)), **options)
    assert e2.value.field == field


def test_field_errors_are_named_as_the_user_set_them(source, capsys, monkeypatch):
    from pigeon.api import Settings
    from pigeon.cli import flag_of

    assert flag_of("mode") == "--refine" and flag_of("max_refinement_km") == "--max-refinement-km"
    assert cli(["locate", "x.jpg", "--bundle", str(source), "--refine", "nearest"]) == 2
    assert "pigeon: error: --refine nearest: unknown refinement mode" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"--refine nearest \(PIGEON_REFINE\): unknown refinement mode"):
        Settings(refine="nearest")


def test_a_photo_without_a_place_label_is_a_place_of_its_own():
    from pigeon.places import place_codes, place_labels

    labels = place_labels(np.array(["a", None, "", "a", "nan", "b"], dtype=object))
    assert labels.tolist() == ["a", "<row 1>", "<row 2>", "a", "<row 4>", "b"]
    codes, names = place_codes(labels)
    assert len(names) == 5 and codes[0] == codes[3]
