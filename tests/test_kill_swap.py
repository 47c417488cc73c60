"""A real `kill -9` at each step of a bundle swap leaves a loadable bundle: the old parts before the
manifest switch, the new ones after it; the next successful swap removes what the kill left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from pigeon.bundle import Bundle
from pigeon.bundle_gallery import load_gallery


@pytest.fixture(scope="module")
def gallery_bundle(tmp_path_factory):
    from worlds import gallery_bundle as make

    return make(tmp_path_factory.mktemp("kill"), seed=3)


def _remove_in_subprocess(bundle, ids, pause_at: str, flag):
    code = ("import numpy as np, sys; from pigeon.indexing import remove_gallery_ids; "
            f"remove_gallery_ids(sys.argv[1], np.array({list(map(int, ids))}))")
    env = {**os.environ, "PIGEON_PAUSE_AT": pause_at, "PIGEON_PAUSE_FILE": str(flag)}
    return subprocess.Popen([sys.executable, "-c", code, str(bundle)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.parametrize("step, switched", [("part-written", False), ("before-switch", False), ("after-switch", True)])
def test_kill_9_during_a_gallery_swap(gallery_bundle, tmp_path, step, switched):
    bundle = gallery_bundle
    before = load_gallery(Bundle(bundle))
    n0 = before.index.ntotal
    ids = before.frame["id"].to_numpy()[:5]
    flag = tmp_path / "paused"
    proc = _remove_in_subprocess(bundle, ids, step, flag)
    deadline = time.time() + 180
    while not flag.exists():
        if proc.poll() is not None:
            pytest.fail(f"the writer ended before pausing at {step}: {proc.stderr.read().decode()[-2000:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"the writer never reached {step}")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    b = Bundle(bundle)
    b.require("cells", "head", "index", "gallery", "clusters")
    g = load_gallery(b)
    assert g.index.ntotal == (n0 - 5 if switched else n0)
    assert set(g.frame["id"]).isdisjoint(ids) == switched
    from pigeon.predictor import Predictor

    assert Predictor.from_bundle(bundle).gallery is not None   # the whole bundle loads and checks
    # the next successful swap leaves exactly one version folder (the live one) and no staging folder
    from pigeon.indexing import remove_gallery_ids

    rest = g.frame["id"].to_numpy()[:1]
    remove_gallery_ids(bundle, rest)
    b = Bundle(bundle)
    live = {b.part_path(p).parent.name for p in ("index", "gallery", "clusters")}
    versions = {d.name for d in bundle.iterdir() if d.is_dir() and d.name.startswith(("v-", ".build-index."))}
    assert len(live) == 1 and versions >= live
    other_dirs = {b.part_path(p).parent.name for p in ("cells", "head")}   # the parts of earlier swaps, in their own folders
    assert versions - live <= other_dirs
    assert load_gallery(b).index.ntotal == g.index.ntotal - 1
    np.testing.assert_array_equal(np.sort(load_gallery(b).frame["id"]), np.sort(np.setdiff1d(g.frame["id"], rest)))


@pytest.mark.parametrize("step, switched", [("part-written", False), ("before-switch", False), ("after-switch", True)])
def test_kill_9_during_a_single_part_swap(tmp_path, step, switched):
    """The same for one part (how `train` swaps head.safetensors and `pretrain` backbone.safetensors):
    after the kill the manifest and the bytes agree (`verify` passes) and hold the old or the new part."""
    b = Bundle(tmp_path / "b", create=True)
    b.write_part("head", lambda p: p.write_bytes(b"old head"))
    flag = tmp_path / "paused"
    code = ("import sys; from pigeon.bundle import Bundle; "
            "Bundle(sys.argv[1]).write_part('head', lambda p: p.write_bytes(b'new head'))")
    env = {**os.environ, "PIGEON_PAUSE_AT": step, "PIGEON_PAUSE_FILE": str(flag)}
    proc = subprocess.Popen([sys.executable, "-c", code, str(b.path)], env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not flag.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert flag.exists(), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "never paused"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    after = Bundle(b.path)
    after.verify()
    assert after.part_path("head").read_bytes() == (b"new head" if switched else b"old head")
    after.write_part("head", lambda p: p.write_bytes(b"third"))
    assert [d.name for d in b.path.iterdir() if d.is_dir()] == [after.part_path("head").parent.name]


@pytest.fixture(scope="module")
def cells_world(tmp_path_factory):
    """A bundle with cells and a head built on them, and the points table of its world."""
    from worlds import world_bundle

    manifest, _, bundle, _ = world_bundle(tmp_path_factory.mktemp("cells-kill"), n_images=80, image_size=32, seed=5, min_size=8, max_size=16)
    return manifest, bundle


@pytest.mark.parametrize("step, switched", [("part-written", False), ("before-switch", False), ("after-switch", True)])
def test_kill_9_during_build_cells_force(cells_world, tmp_path, step, switched):
    """`build-cells --force` swaps cells.parquet like every other part (a version folder, one manifest
    rename): a kill at any step leaves the old bundle (cells and head agree, it serves) or the new one
    (new cells, verified; the head orphaned, as after a finished --force), never new cells under the old manifest."""
    import shutil

    from pigeon.loading import load_cells
    from pigeon.predictor import Predictor

    manifest, src = cells_world
    bundle = tmp_path / "b"
    shutil.copytree(src, bundle)
    old_hash = Bundle(bundle).cells_hash
    flag = tmp_path / "paused"
    env = {**os.environ, "PIGEON_PAUSE_AT": step, "PIGEON_PAUSE_FILE": str(flag)}
    args = ["build-cells", "--points", str(manifest), "--out", str(bundle / "cells.parquet"), "--force", "--min-size", "5", "--max-size", "10", "-q"]
    proc = subprocess.Popen([sys.executable, "-m", "pigeon.cli", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not flag.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert flag.exists(), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "never paused"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    b = Bundle(bundle)
    b.verify()                                   # the manifest and the bytes agree, whichever state it is in
    assert (b.cells_hash != old_hash) == switched   # cells_hash: the sha256 of the file in force
    in_force = load_cells(b)
    if switched:
        with pytest.raises(Exception, match="other cells"):
            b.require("head")
    else:
        assert Predictor.from_bundle(bundle).n_cells == len(in_force)   # the old bundle serves as before
    # the cells path given on the command line still names the cells in force
    from pigeon.geocells import GeoCells

    assert GeoCells.load(bundle / "cells.parquet").hash == in_force.hash
    # the next successful build leaves no trace of the killed one
    from pigeon.commands.cells import build_cells_file

    build_cells_file(manifest, bundle / "cells.parquet", min_size=6, max_size=12, progress=False, force=True)
    b = Bundle(bundle)
    b.verify()
    live = {b.part_path(p).parent.name for p in b.manifest["parts"]}
    assert {d.name for d in bundle.iterdir() if d.is_dir() and d.name.startswith("v-")} == live
    assert not (bundle / "cells.parquet").exists() and b.part_path("cells").parent != bundle
