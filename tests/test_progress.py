"""Progress where jobs run (`pigeon.core.progress`): a tqdm bar on a terminal; elsewhere (SLURM, docker,
CI, a pipe) one plain line at most every interval and one at the end, `[rank R] ` first under torchrun,
never a carriage return; nothing at all when disabled."""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tqdm.std import tqdm as TqdmBar

from pigeon.core import progress as pg
from pigeon.core.progress import INTERVAL_ENV, PlainProgress, progress

ROOT = Path(__file__).resolve().parents[1]
CLOCK = r"\d+:\d\d:\d\d"


def _line(desc: str, total: int, unit: str, rank: str = "") -> re.Pattern:
    return re.compile(rf"^{re.escape(rank)}{re.escape(desc)}: (\d+)/{total} {unit}, [0-9.e+]+ {unit}/s, ETA {CLOCK}, elapsed {CLOCK}$")


@pytest.fixture(autouse=True)
def _alone(monkeypatch):
    """One process, the interval from the test, whatever the environment running the tests says."""
    for k in ("RANK", "WORLD_SIZE", INTERVAL_ENV):
        monkeypatch.delenv(k, raising=False)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _slow_loop(n: int, pause: float, **kw) -> float:
    t0 = time.monotonic()
    for _ in progress(range(n), desc="count", unit="item", **kw):
        time.sleep(pause)
    return time.monotonic() - t0


def test_off_a_terminal_a_plain_line_per_interval_and_one_at_the_end(capsys, monkeypatch):
    interval = 0.05
    monkeypatch.setenv(INTERVAL_ENV, str(interval))
    assert not sys.stderr.isatty()                       # capsys: stderr is not a terminal
    duration = _slow_loop(20, 0.02)
    err = capsys.readouterr().err
    assert "\r" not in err and err.endswith("\n")
    lines = err.splitlines()
    assert 2 <= len(lines) <= math.ceil(duration / interval) + 1, (duration, lines)
    pat = _line("count", 20, "item")
    done = [int(pat.match(l).group(1)) for l in lines if pat.match(l)]
    assert len(done) == len(lines), lines
    assert done == sorted(done) and done[-1] == 20
    assert lines[-1].startswith("count: 20/20 item") and "ETA 0:00:00" in lines[-1]


def test_the_default_interval_is_30_s(capsys):
    assert pg.interval_s() == pg.INTERVAL_S == 30
    _slow_loop(5, 0.0)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("count: 5/5 item, ")   # only the closing line


def test_rank_prefix_under_torchrun(capsys, monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "0")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    _slow_loop(3, 0.0)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and all(_line("count", 3, "item", rank="[rank 1] ").match(l) for l in lines), lines
    monkeypatch.setenv("WORLD_SIZE", "1")                # a single process: no prefix
    _slow_loop(3, 0.0)
    assert all(l.startswith("count: ") for l in capsys.readouterr().err.splitlines())


def test_a_terminal_gets_tqdm(monkeypatch):
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    bar = progress(range(3), desc="count", unit="item")
    assert isinstance(bar, TqdmBar)
    assert list(bar) == [0, 1, 2]
    assert "\r" in term.getvalue()                       # tqdm redraws in place
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    bar = progress(total=2, desc="count")
    assert isinstance(bar, TqdmBar) and bar.desc == "[rank 3] count"
    bar.close()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert isinstance(progress(range(3)), PlainProgress)


@pytest.mark.parametrize("terminal", [False, True])
def test_disable_writes_nothing(terminal, capsys, monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "0")
    if terminal:
        monkeypatch.setattr(sys, "stderr", _Terminal())
    assert list(progress(range(4), desc="quiet", disable=True)) == [0, 1, 2, 3]
    with progress(total=4, desc="quiet", disable=True) as bar:
        bar.update(4)
        bar.set_postfix(loss="0.1")
    assert bar.n == 4
    out = sys.stderr.getvalue() if terminal else capsys.readouterr().err
    assert out == ""


def test_by_hand_unknown_total_postfix_and_leave(capsys, monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "0")
    with progress(desc="steps", unit="step", initial=2) as bar:     # no total: no ETA
        bar.update(3)
        bar.set_postfix(loss="0.1234", lr=1e-4)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2                                           # the update, then the close with its postfix
    assert re.match(rf"^steps: 5 step, [0-9.e+]+ step/s, elapsed {CLOCK}, loss=0.1234, lr=0.0001$", lines[-1]), lines
    assert "ETA" not in "".join(lines)
    for _ in progress(range(2), desc="epoch", leave=False):          # tqdm erases it: no closing line
        pass
    assert len(capsys.readouterr().err.splitlines()) == 2            # the two updates only
    with progress(total=2, desc="shards", unit="shard") as bar:
        bar.update(2)                                                # interval 0: a line now ...
    assert len(capsys.readouterr().err.splitlines()) == 1            # ... and the close repeats none


def test_a_bad_interval_is_named_and_the_default_kept(monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "soon")
    with pytest.warns(UserWarning, match=INTERVAL_ENV):
        assert pg.interval_s() == 30


def test_pigeon_embed_writes_plain_lines_to_a_pipe(tmp_path):
    """A real command with stderr piped (as under SLURM or docker): no carriage return, plain lines."""
    from pigeon.datasets.synthetic import make_world

    manifest = make_world(tmp_path / "world", n_images=32, image_size=32, seed=3)
    env = {**os.environ, INTERVAL_ENV: "0", "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-m", "pigeon.cli", "embed", "--data", str(manifest), "--backbone", "tiny",
                        "--out", str(tmp_path / "emb"), "--rows-per-shard", "8", "--batch-size", "8"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["shards"] == 4
    assert "\r" not in r.stderr
    pat = _line("embed manifest shards", 4, "shard")
    lines = [l for l in r.stderr.splitlines() if l.startswith("embed manifest shards")]
    assert [int(pat.match(l).group(1)) for l in lines] == [1, 2, 3, 4], r.stderr     # each shard (the close repeats no line)
