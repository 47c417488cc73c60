"""A bundle is verified before it serves: changed bytes, wrong checksums, missing parts, a manifest that
is not one, an unknown format or refinement mode are each refused by name with one line."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

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


def test_a_verified_large_part_is_hashed_once_at_start(bundle, monkeypatch):
    """At start the (size, mtime) cache may vouch for a large part (index, gallery, clusters); the small
    ones (cells, head) are hashed at every start."""
    Predictor.from_bundle(bundle)
    calls = []
    real = pigeon.bundle.file_sha256
    monkeypatch.setattr(pigeon.bundle, "file_sha256", lambda p, *a: calls.append(p) or real(p, *a))
    b = Bundle(bundle)
    assert sorted(b.verify()) == ["cells", "head"]
    assert sorted(Path(p).name for p in calls) == ["cells.parquet", "head.safetensors"]
    assert b.verify() == [] and b.unhashed(*pigeon.bundle.LARGE_PARTS) == ["index", "gallery", "clusters"]
    _flip(Bundle(bundle).part_path("clusters"))   # a change (new mtime) is hashed again and refused
    with pytest.raises(UserError, match="clusters.parquet does not match"):
        Bundle(bundle).verify()


def test_parts_just_written_are_not_hashed_again(tmp_path, monkeypatch):
    """`write_parts` hashed the files while writing: the writing object does not hash them again, and
    the first load of a large part finds it in `.verified.json` (a small one is hashed at every start)."""
    b = Bundle(tmp_path / "w", create=True)
    b.write_part("head", lambda p: p.write_bytes(b"a head"))
    b.write_part("index", lambda p: p.write_bytes(b"an index"))
    calls = []
    real = pigeon.bundle.file_sha256
    monkeypatch.setattr(pigeon.bundle, "file_sha256", lambda p, *a: calls.append(Path(p).name) or real(p, *a))
    assert b.verify() == []
    fresh = Bundle(b.path)
    fresh.verify()
    fresh.verify("head")
    assert calls == ["head.safetensors"]
    assert set(json.loads((b.path / ".verified.json").read_text())) == {fresh.meta("head")["file"], fresh.meta("index")["file"]}


# -- issue 20: trust what is on disk, not its timestamp --------------------------------------------

def _flip_keep_stamp(path, n: int = 64, at: float = 0.5) -> None:
    """Flip `n` bytes and put the mtime back: what silent disk corruption looks like (size and mtime unchanged)."""
    st = path.stat()
    _flip(path, n, at)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def _hash_calls(monkeypatch) -> list:
    calls = []
    real = pigeon.bundle.file_sha256
    monkeypatch.setattr(pigeon.bundle, "file_sha256", lambda p, *a: calls.append(Path(p).name) or real(p, *a))
    return calls


@pytest.mark.parametrize("part", ["head", "cells"])
def test_a_small_part_corrupted_under_an_unchanged_stamp_is_refused(bundle, part):
    """Failure 1: small parts are hashed at every start, never trusted from `.verified.json`'s (size, mtime)."""
    Predictor.from_bundle(bundle)   # records every part in .verified.json
    f = Bundle(bundle).part_path(part)
    _flip_keep_stamp(f)
    with pytest.raises(UserError, match=f"{f.name} does not match the sha256"):
        Predictor.from_bundle(bundle)


def test_a_forged_verified_record_does_not_vouch_for_a_changed_head(bundle):
    Predictor.from_bundle(bundle)
    f = Bundle(bundle).part_path("head")
    _flip(f)
    rel = f.relative_to(bundle).as_posix()
    cache = json.loads((bundle / ".verified.json").read_text())
    st = f.stat()
    cache[rel] = [st.st_size, st.st_mtime_ns, Bundle(bundle).meta("head")["sha256"]]   # forged: the new stamp, the old hash
    (bundle / ".verified.json").write_text(json.dumps(cache))
    with pytest.raises(UserError, match="head.safetensors does not match the sha256"):
        Predictor.from_bundle(bundle)


@pytest.mark.parametrize("part", ["head", "index"])
def test_a_part_record_without_sha256_is_refused_by_name(bundle, part):
    def drop(m):
        del m["parts"][part]["sha256"]
        return m

    _edit_manifest(bundle, drop)
    with pytest.raises(UserError, match=f"part '{part}' has no sha256"):
        Predictor.from_bundle(bundle)
    from worlds import cli

    assert cli(["verify", str(bundle)]) == 2


@pytest.mark.parametrize("content", [b"[]", b"[1, 2]", b'"a string"', b"3", b"null", b'{"head.safetensors": "bad"}',
                                     b'{"head.safetensors": [1, 2]}', b"\xff\xfe not json"])
def test_a_malformed_verified_file_is_ignored_and_everything_rehashed(bundle, monkeypatch, content):
    """Failure 2: `.verified.json` holding a list, a string, a number or bad records is no traceback."""
    Predictor.from_bundle(bundle)
    (bundle / ".verified.json").write_bytes(content)
    calls = _hash_calls(monkeypatch)
    Predictor.from_bundle(bundle)
    assert sorted(calls) == sorted(Bundle(bundle).part_path(p).name for p in Bundle(bundle).manifest["parts"])


@pytest.mark.parametrize("file, needle", [
    ("/etc/hostname", "must be a relative path"),
    ("../outside/head.safetensors", "must be a relative path"),
    (5, "must be a relative path"),
    (["head.safetensors"], "must be a relative path"),
    ("", "must be a relative path"),
])
def test_a_part_file_that_is_not_a_relative_path_is_refused_by_name(bundle, file, needle):
    """Failure 2: an absolute path (ValueError from relative_to) or a non-string (TypeError) crashed start-up."""
    def bad(m):
        m["parts"]["head"]["file"] = file
        return m

    _edit_manifest(bundle, bad)
    with pytest.raises(UserError, match=f"part 'head'.*{needle}"):
        Predictor.from_bundle(bundle)
    from worlds import cli

    assert cli(["verify", str(bundle)]) == 2


def test_a_part_file_that_leaves_the_bundle_through_a_symlink_is_refused(bundle, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    head = Bundle(bundle).part_path("head")
    shutil.copy(head, outside / "head.safetensors")
    (bundle / "escape").symlink_to(outside, target_is_directory=True)

    def bad(m):
        m["parts"]["head"]["file"] = "escape/head.safetensors"
        return m

    _edit_manifest(bundle, bad)
    with pytest.raises(UserError, match="part 'head'.*outside the bundle"):
        Predictor.from_bundle(bundle)


@pytest.mark.parametrize("part, key, value", [
    ("head", "n_cells", "+1"), ("head", "embed_dim", "*2"), ("cells", "n_cells", "+1"),
    ("index", "count", "+1"), ("gallery", "count", "-1"), ("index", "dim", "*2"),
])
def test_manifest_facts_are_checked_against_the_parts(bundle, part, key, value):
    """Failure 7: a manifest saying n_cells 70 or embed_dim 64 for a 69-cell, 32-d head was served."""
    from pigeon.head import PrototypeHead
    from pigeon.loading import load_cells

    b = Bundle(bundle)
    head = PrototypeHead.load(b.part_path("head"))
    truth = {("head", "n_cells"): head.n_cells, ("head", "embed_dim"): head.embed_dim, ("cells", "n_cells"): len(load_cells(b)),
             ("index", "count"): b.meta("index")["count"], ("gallery", "count"): b.meta("gallery")["count"],
             ("index", "dim"): b.meta("index")["dim"]}[(part, key)]
    wrong = truth * 2 if value == "*2" else truth + int(value)

    def lie(m):
        m["parts"][part][key] = wrong
        return m

    _edit_manifest(bundle, lie)
    with pytest.raises(UserError, match=rf"{pigeon.bundle.PART_FILES[part]}.*{key}\D*\b{wrong}\b.*\b{truth}\b"):
        Predictor.from_bundle(bundle)


def test_the_verify_command_hashes_everything(bundle, monkeypatch, capsys):
    from worlds import cli

    Predictor.from_bundle(bundle)   # every part in .verified.json: `pigeon verify` hashes them all the same
    calls = _hash_calls(monkeypatch)
    assert cli(["verify", str(bundle)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    names = {p: Bundle(bundle).part_path(p).name for p in Bundle(bundle).manifest["parts"]}
    assert sorted(calls) == sorted(names.values())
    assert set(out["parts"]) == set(names) and out["ok"] is True
    _flip_keep_stamp(Bundle(bundle).part_path("clusters"))
    assert cli(["verify", str(bundle)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("pigeon: error:")]
    assert len(err) == 1 and "clusters.parquet does not match the sha256" in err[0]


def _health_until(client, settle, timeout: float = 60.0):
    deadline = time.time() + timeout
    while True:
        r = client.get("/health")
        if settle(r) or time.time() > deadline:
            return r
        time.sleep(0.05)


def test_a_large_part_corrupted_under_an_unchanged_stamp_is_caught_in_the_background(bundle):
    """Failure 1 for the large parts: the (size, mtime) cache may skip the blocking hash at start, never
    the background one; a mismatch turns /health unhealthy (503), /locate answers 503 naming the part,
    and an error is logged."""
    import logging

    from fastapi.testclient import TestClient

    from pigeon.api import Settings, create_app
    from api_support import encode, photo

    Predictor.from_bundle(bundle)
    _flip_keep_stamp(Bundle(bundle).part_path("index"), n=64, at=0.6)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("pigeon.api").addHandler(handler)
    try:
        with TestClient(create_app(bundle, Settings(warmup=False))) as c:
            r = _health_until(c, lambda r: r.json().get("status") != "verifying")
            assert r.status_code == 503, r.text
            h = r.json()
            assert h["status"] == "unhealthy" and "index.faiss does not match the sha256" in h["detail"]
            assert c.head("/health").status_code == 503
            loc = c.post("/locate", files={"image": ("p.jpg", encode(photo()), "image/jpeg")})
            assert loc.status_code == 503 and loc.json()["error"] == "bundle_damaged"
            assert "index.faiss" in loc.json()["detail"]
    finally:
        logging.getLogger("pigeon.api").removeHandler(handler)
    assert any(rec.levelno == logging.ERROR and "index.faiss" in rec.getMessage() for rec in records)


def test_health_reports_verifying_until_the_background_hash_is_done(bundle, monkeypatch):
    import threading

    from fastapi.testclient import TestClient

    from pigeon.api import Settings, create_app
    from api_support import encode, photo

    Predictor.from_bundle(bundle)   # large parts in .verified.json: the start skips their blocking hash
    release = threading.Event()
    real = pigeon.bundle.file_sha256
    hashed = []

    def slow(p, *a):
        hashed.append(Path(p).name)
        if Path(p).name in ("index.faiss", "gallery.parquet", "clusters.parquet"):
            release.wait(60)
        return real(p, *a)

    monkeypatch.setattr(pigeon.bundle, "file_sha256", slow)
    with TestClient(create_app(bundle, Settings(warmup=False))) as c:
        r = c.get("/health")
        assert r.status_code == 200 and r.json()["status"] == "verifying"
        assert {"in_flight", "capacity", "cells"} <= set(r.json())
        assert c.post("/locate", files={"image": ("p.jpg", encode(photo()), "image/jpeg")}).status_code == 200  # verifying still answers
        release.set()
        r = _health_until(c, lambda r: r.json().get("status") != "verifying")
        assert r.status_code == 200 and r.json()["status"] == "ok"
    assert {"index.faiss", "gallery.parquet", "clusters.parquet"} <= set(hashed)   # the background hash ignores the cache


@pytest.mark.parametrize("named", [True, False])
def test_a_bundle_with_its_cells_at_top_level_still_loads(bundle, named):
    """Bundles written before the cells went into version folders: cells.parquet at top level, named by
    the manifest (or by no `file` at all). They load, `BUNDLE/cells.parquet` reads them, and a later swap
    of another part leaves them in force."""
    from pigeon.geocells import GeoCells

    b = Bundle(bundle)
    shutil.move(b.part_path("cells"), bundle / "cells.parquet")

    def old(m):
        if named:
            m["parts"]["cells"]["file"] = "cells.parquet"
        else:
            del m["parts"]["cells"]["file"]
        return m

    _edit_manifest(bundle, old)
    n = len(GeoCells.load(bundle / "cells.parquet"))
    assert Predictor.from_bundle(bundle).n_cells == n
    b = Bundle(bundle)
    head, meta = b.part_path("head"), {k: v for k, v in b.meta("head").items() if k not in ("file", "sha256", "created", "pigeon_version")}
    b.write_part("head", lambda p: shutil.copyfile(head, p), **meta)
    assert (bundle / "cells.parquet").is_file() and Bundle(bundle).part_path("cells") == bundle / "cells.parquet"
    assert Predictor.from_bundle(bundle).n_cells == n
