"""A bundle is verified before it serves: changed bytes, wrong checksums, missing parts, a manifest that
is not one, an unknown format or refinement mode are each refused by name with one line."""

from __future__ import annotations

import json
import shutil

import pytest

import pigeon.bundle
from pigeon.bundle import Bundle
from pigeon.core.errors import UserError
from pigeon.index import RefineConfig
from pigeon.predictor import Predictor


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    from worlds import gallery_bundle as make

    return make(tmp_path_factory.mktemp("trust"), seed=4)


@pytest.fixture
def bundle(source, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(source, dst)
    (dst / ".verified.json").unlink(missing_ok=True)
    return dst


def _flip(path, n: int = 64, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i:i + n] = bytes(b ^ 0xFF for b in data[i:i + n])
    path.write_bytes(bytes(data))


def _edit_manifest(bundle, fn) -> None:
    m = json.loads((bundle / "manifest.json").read_text())
    m = fn(m)
    (bundle / "manifest.json").write_text(json.dumps(m))


def test_an_intact_bundle_loads(bundle):
    assert Predictor.from_bundle(bundle).gallery is not None


@pytest.mark.parametrize("part", ["head", "clusters", "index", "gallery", "cells"])
def test_flipped_bytes_are_refused_by_name(bundle, part):
    f = Bundle(bundle).part_path(part)
    _flip(f)
    with pytest.raises(UserError, match=f"{f.name} does not match the sha256"):
        Predictor.from_bundle(bundle)


def test_a_wrong_checksum_in_the_manifest_is_refused(bundle):
    def wrong(m):
        m["parts"]["head"]["sha256"] = "0" * 64
        return m

    _edit_manifest(bundle, wrong)
    with pytest.raises(UserError, match="head.safetensors does not match the sha256"):
        Predictor.from_bundle(bundle)


@pytest.mark.parametrize("part", ["index", "gallery", "clusters"])
def test_a_listed_part_that_is_missing_is_refused(bundle, part):
    name = Bundle(bundle).part_path(part)
    name.unlink()
    for refine in (None, RefineConfig(mode="cluster+nn")):
        with pytest.raises(UserError, match=f"lists {name.name} but .* is missing"):
            Predictor.from_bundle(bundle, refine=refine)


def test_a_refinement_the_bundle_cannot_serve_is_refused(bundle):
    _edit_manifest(bundle, lambda m: {**m, "parts": {k: v for k, v in m["parts"].items() if k not in ("index", "gallery", "clusters")}})
    assert Predictor.from_bundle(bundle).gallery is None   # no gallery listed: answers are cell centres
    assert Predictor.from_bundle(bundle, refine=RefineConfig(mode="none")).gallery is None
    with pytest.raises(UserError, match="--refine nn: .* has no gallery index"):
        Predictor.from_bundle(bundle, refine=RefineConfig(mode="nn"))


@pytest.mark.parametrize("content, needle", [
    (b"[]", "not a pigeon manifest"),
    (b"null", "not a pigeon manifest"),
    (b"\x00\xff\xfe binary", "unreadable"),
    (b'{"format": 1}', "not a pigeon manifest"),
    (b'{"format": 99, "parts": {}}', "format 99"),
])
def test_a_manifest_that_is_not_one_is_refused(bundle, content, needle):
    (bundle / "manifest.json").write_bytes(content)
    with pytest.raises(UserError, match=needle):
        Predictor.from_bundle(bundle)


def test_a_null_part_record_and_an_unknown_mode_are_refused(bundle):
    _edit_manifest(bundle, lambda m: {**m, "parts": {**m["parts"], "head": None}})
    with pytest.raises(UserError, match="part 'head' is unknown or not a record"):
        Predictor.from_bundle(bundle)


def test_an_unknown_recorded_refine_mode_is_refused(bundle):
    def mode(m):
        m["parts"]["index"]["refine_mode"] = "teleport"
        return m

    _edit_manifest(bundle, mode)
    with pytest.raises(UserError, match="'teleport'"):
        Predictor.from_bundle(bundle)


def test_a_deleted_manifest_is_named(bundle):
    (bundle / "manifest.json").unlink()
    with pytest.raises(UserError, match="has no manifest.json"):
        Predictor.from_bundle(bundle)


def test_a_verified_part_is_hashed_once(bundle, monkeypatch):
    Predictor.from_bundle(bundle)
    calls = []
    real = pigeon.bundle.file_sha256
    monkeypatch.setattr(pigeon.bundle, "file_sha256", lambda p, *a: calls.append(p) or real(p, *a))
    Bundle(bundle).verify()
    assert calls == []
    _flip(Bundle(bundle).part_path("clusters"))   # a change (new mtime) is hashed again and refused
    with pytest.raises(UserError, match="clusters.parquet does not match"):
        Bundle(bundle).verify()


def test_parts_just_written_are_not_hashed_again(tmp_path, monkeypatch):
    """`write_parts` hashed the files while writing: the first load finds them in `.verified.json`,
    and a second `verify` of the same object does no work at all."""
    b = Bundle(tmp_path / "w", create=True)
    b.write_part("head", lambda p: p.write_bytes(b"a head"))
    calls = []
    real = pigeon.bundle.file_sha256
    monkeypatch.setattr(pigeon.bundle, "file_sha256", lambda p, *a: calls.append(p) or real(p, *a))
    fresh = Bundle(b.path)
    fresh.verify()
    fresh.verify("head")
    assert calls == []
    assert set(json.loads((b.path / ".verified.json").read_text())) == {fresh.meta("head")["file"]}
