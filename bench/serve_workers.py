"""RSS of `pigeon serve --workers 1` and `--workers 2` on one bundle whose gallery was built from an
embedding folder (issue 11): the index is memory-mapped, so a second worker adds only its private memory.

Needs the bundle and the 1M embedding folder that `bench/scale.py train --sizes 1000000` leaves in
/tmp/pigeon-scale (WORK). Usage: .venv/bin/python bench/serve_workers.py ivfpq [flat]
"""
import json, os, shutil, subprocess, sys, time, urllib.request
import psutil
work = os.environ.get("WORK", "/tmp/pigeon-scale")
py = sys.executable
out = {}
for kind in sys.argv[1:] or ["ivfpq"]:
    b = f"{work}/bundle-{kind}"
    if not os.path.exists(f"{b}/manifest.json") or "index" not in json.load(open(f"{b}/manifest.json"))["parts"]:
        shutil.rmtree(b, ignore_errors=True)
        shutil.copytree(f"{work}/bundle", b)
        t = time.time()
        p = subprocess.run([py, "-m", "pigeon.cli", "build-index", "--bundle", b, "--embeddings", f"{work}/emb-1000000",
                            "--kind", kind, "--splits", "train"], capture_output=True, text=True)
        print(kind, "build", round(time.time() - t, 1), p.stdout[-400:], p.stderr[-800:], flush=True)
    size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(b) for f in fs if f.startswith("index"))
    for workers in (1, 2):
        port = 8790 + workers
        proc = subprocess.Popen([py, "-m", "pigeon.cli", "serve", "--bundle", b, "--port", str(port), "--workers", str(workers)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2); break
            except Exception:
                time.sleep(1)
        time.sleep(5)
        kids = psutil.Process(proc.pid).children(recursive=True)
        procs = [psutil.Process(proc.pid)] + kids
        rss = sorted(round(p.memory_info().rss / 2**30, 3) for p in procs)
        uss = sorted(round(p.memory_full_info().uss / 2**30, 3) for p in procs)
        print(json.dumps({"kind": kind, "workers": workers, "index_file_gib": round(size / 2**30, 3),
                          "rss_gib_per_process": rss, "uss_gib_per_process": uss}), flush=True)
        os.killpg(proc.pid, 15); proc.wait(timeout=60)
