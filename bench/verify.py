"""What verifying a bundle costs: at start-up (large parts vouched for by `.verified.json`), and the full
hash of the large parts that the service runs in the background after it starts (and `pigeon verify`).

A 1M-photo gallery at 512-d is ~2 GB of float32 vectors in index.faiss (flat). This writes a part of that
size through `Bundle.write_parts` (random bytes: hashing speed does not depend on the content), then times
`Bundle.verify()` the first time (every byte hashed), again (size + mtime match `.verified.json`: the
blocking check at start), and the background check (`BackgroundVerify`: every byte hashed, never the
cache's word) until /health would leave `verifying`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from pigeon.bundle import BackgroundVerify, Bundle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="gallery photos")
    ap.add_argument("--dim", type=int, default=512)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    nbytes = a.n * a.dim * 4
    with tempfile.TemporaryDirectory(dir=".") as d:
        b = Bundle(Path(d) / "b", create=True)

        def write(p: Path) -> None:
            with open(p, "wb") as f:
                for _ in range(0, nbytes, 1 << 26):
                    f.write(rng.bytes(min(1 << 26, nbytes - f.tell())))

        b.write_parts({"index": write})
        (Path(d) / "b" / ".verified.json").unlink(missing_ok=True)
        t0 = time.perf_counter()
        Bundle(b.path).verify()
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        started = Bundle(b.path)
        started.verify()
        again = time.perf_counter() - t0
        t0 = time.perf_counter()
        state = BackgroundVerify(started).start().join()
        background = time.perf_counter() - t0
        assert state == "ok", state
    print(json.dumps({"bench": "verify", "n": a.n, "dim": a.dim, "part_gib": round(nbytes / 2**30, 2),
                      "first_load_s": round(first, 2), "hash_gib_per_s": round(nbytes / 2**30 / first, 2),
                      "cached_load_ms": round(again * 1000, 2), "background_verify_s": round(background, 2)}))


if __name__ == "__main__":
    main()
