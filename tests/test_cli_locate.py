"""`pigeon locate` on bad options and bad files: one line, exit 2, and the good files still answered."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest



@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from worlds import world_bundle

    root = tmp_path_factory.mktemp("loc")
    manifest, df, bundle, _ = world_bundle(root, n_images=60, image_size=48, seed=11, min_size=8, max_size=16)
    return root, df, bundle


def _run(args: list[str]) -> int:
    from worlds import cli

    return cli(args)


@pytest.mark.parametrize("extra, needle", [
    (["--batch-size", "0"], "--batch-size 0"),
    (["--top-k", "0"], "--top-k 0"),
    (["--top-k", "-1"], "--top-k -1"),
    (["--out", "/proc/x/y.csv"], "--out /proc/x/y.csv"),
    (["--out", "r.txt"], "--out r.txt"),
    (["--device", "cuda:7"], "--device cuda:7"),
    (["--device", "banana"], "--device 'banana'"),
])
def test_bad_options_are_one_line_exit_2(small, capsys, extra, needle):
    root, df, bundle = small
    img = str(root / "world" / df["image"][0])
    assert _run(["locate", img, "--bundle", str(bundle), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0]


def test_a_folder_with_bad_files_answers_the_good_ones(small, tmp_path, capsys):
    root, df, bundle = small
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in df["image"][:3]:
        shutil.copy(root / "world" / name, folder / f"good_{len(list(folder.iterdir()))}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "empty.png").write_bytes(b"")
    out = tmp_path / "r.csv"
    assert _run(["locate", str(folder), "--bundle", str(bundle), "--out", str(out)]) == 0
    cap = capsys.readouterr()
    table = pd.read_csv(out)
    assert sorted(p.rsplit("/", 1)[1] for p in table["image"]) == ["good_0.png", "good_1.png", "good_2.png"]
    skipped = [line for line in cap.err.splitlines() if line.startswith("pigeon: skipped")]
    assert len(skipped) == 2 and any("broken.jpg" in s for s in skipped) and any("empty.png" in s for s in skipped)
    # --strict stops at the first bad file and writes nothing
    out2 = tmp_path / "strict.csv"
    assert _run(["locate", str(folder), "--bundle", str(bundle), "--out", str(out2), "--strict"]) == 2
    assert not out2.exists() and "--strict" in capsys.readouterr().err


def test_only_bad_files_is_an_error(small, tmp_path, capsys):
    root, df, bundle = small
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    assert _run(["locate", str(bad), "--bundle", str(bundle)]) == 2
    err = capsys.readouterr().err
    assert "skipped" in err and "none of the 1 images could be read" in err


def test_build_cells_over_a_trained_bundle_needs_force(small, tmp_path, capsys):
    """New cells would orphan the head: refused (nothing written) unless --force, which says what to rebuild."""
    root, df, bundle = small
    b2 = tmp_path / "b2"
    shutil.copytree(bundle, b2)
    pts = tmp_path / "pts.csv"
    df[["lat", "lon"]].iloc[::2].to_csv(pts, index=False)   # other points: other cells
    before = (b2 / "manifest.json").read_bytes()
    assert _run(["build-cells", "--points", str(pts), "--out", str(b2 / "cells.parquet"), "--min-size", "5", "--max-size", "10", "-q"]) == 2
    err = capsys.readouterr().err
    assert "head.safetensors" in err and "--force" in err and (b2 / "manifest.json").read_bytes() == before
    assert _run(["build-cells", "--points", str(pts), "--out", str(b2 / "cells.parquet"), "--min-size", "5", "--max-size", "10",
                 "-q", "--force"]) == 0
    import json

    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["must_rebuild"] == ["head"]
    from pigeon.core.errors import UserError
    from pigeon.predictor import Predictor

    with pytest.raises(UserError, match="other cells"):
        Predictor.from_bundle(b2)


@pytest.mark.parametrize("cmd, needle", [
    (["build-index", "--batch-size", "0"], "--batch-size 0"),
    (["build-index", "--workers", "-1"], "--workers -1"),
    (["evaluate", "--out", "/proc/x/y"], "--out /proc/x/y"),
    (["evaluate", "--device", "cuda:7"], "--device cuda:7"),
])
def test_other_commands_refuse_bad_options_in_one_line(small, capsys, cmd, needle):
    root, df, bundle = small
    data = ["--images" if cmd[0] == "build-index" else "--data", str(root / "world" / "manifest.csv")]
    assert _run([cmd[0], "--bundle", str(bundle), *data, *cmd[1:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]
