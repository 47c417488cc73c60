"""`pigeon serve` as a process: a bad setting is one line and exit 2 before anything loads; SIGTERM
ends the server within 10 s even while a client holds a request open (uvicorn's graceful-shutdown
timeout: requests in flight get `graceful_shutdown_s`, then they are cancelled)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from api_support import tiny_bundle

CLI = [sys.executable, "-c", "from pigeon.cli import main; main()", "serve"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args,env,words", [
    (["--max-concurrency", "0"], {}, ["max_concurrency", "integer >= 1"]),
    ([], {"PIGEON_API_KEY": ""}, ["PIGEON_API_KEY is set but empty: unset it for no auth, or give a key"]),
])
def test_bad_setting_is_one_line_and_exit_2(args, env, words):
    r = subprocess.run([*CLI, "--bundle", str(tiny_bundle()), *args], capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    assert r.returncode == 2, r.stderr
    assert all(w in r.stderr for w in words) and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("case", ["busy port", "bad host"])
def test_a_busy_port_or_a_bad_host_fails_fast_in_one_line(case, tmp_path):
    """Checked before the bundle loads: the bundle here does not even exist, and the error is about the port/host."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        args = ["--port", str(port)] if case == "busy port" else ["--host", "no-such-host.invalid", "--port", str(_free_port())]
        r = subprocess.run([*CLI, "--bundle", str(tmp_path / "missing"), *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert (f"--port {port}: 127.0.0.1:{port} is already in use" if case == "busy port" else "--host no-such-host.invalid") in lines[0]


def test_sigterm_exits_within_10_s_while_an_upload_is_stalled():
    port = _free_port()
    env = {**os.environ, "PIGEON_WARMUP": "false"}
    env.pop("PIGEON_API_KEY", None)
    proc = subprocess.Popen([*CLI, "--bundle", str(tiny_bundle()), "--port", str(port), "--log-level", "warning"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "server did not come up in 120 s"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        # a client that announces an upload, sends a few bytes and stalls: a request in flight
        stalled = socket.create_connection(("127.0.0.1", port))
        stalled.sendall(b"POST /locate HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary=B\r\n"
                        b"Content-Length: 100000\r\n\r\n--B\r\n")
        for _ in range(50):
            if httpx.get(url + "/health", timeout=2).json()["in_flight"] == 1:
                break
            time.sleep(0.1)
        assert httpx.get(url + "/health", timeout=2).json()["in_flight"] == 1
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail("pigeon serve was still running 10 s after SIGTERM")
        assert time.time() - t0 < 10
        stalled.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_device_this_machine_lacks_is_refused_in_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    r = subprocess.run([*CLI, "--bundle", str(tiny_bundle()), "--device", "cuda", "--port", str(_free_port())],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "--device cuda (PIGEON_DEVICE): this machine has 0 CUDA device(s); use cpu" in r.stderr and "Traceback" not in r.stderr
