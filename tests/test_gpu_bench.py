"""bench/gpu.py cannot rot: its `--smoke` mode runs the same code on the CPU with `tiny` (every part:
bare forward, embed with loader workers, /locate against the bare forward, pretrain, head training)
and prints one JSON with every figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_smoke_runs_every_part(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke", "--out", str(tmp_path / "gpu.json")],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out == json.loads((tmp_path / "gpu.json").read_text())
    assert out["smoke"] and out["backbone"] == "tiny"
    fwd = out["forward_images_per_s"]
    assert set(fwd) == {"fp32_b1", "fp32_b8", "bf16_b1", "bf16_b8"} and all(v > 0 for v in fwd.values())
    assert {k for k in out["embed"] if k.startswith("workers_")} == {"workers_0", "workers_2"}
    assert all(out["embed"][k]["embedded"] == 32 and out["embed"][k]["over_bare_bf16"] > 0 for k in ("workers_0", "workers_2"))
    s = out["serve"]
    assert s["errors"] == 0 and s["p50_over_bare_b1"] > 0 and s["rps_over_bare_batched"] > 0
    assert out["pretrain"]["steps"] == 2 and out["pretrain"]["final_loss"] > 0
    assert out["head"]["rows"] == 20_000 and out["head"]["seconds_per_step"] > 0
    assert "| /locate p50, 1 client |" in r.stderr   # the table for docs/benchmarks.md
