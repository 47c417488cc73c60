"""`pigeon serve`: the HTTP service (POST /locate, the web page) over one bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pigeon.core.errors import UserError


def check_bindable(host: str, port: int) -> None:
    """Refuse, in one line, a `--host` that is not an address of this machine or a `--port` that is
    taken, before anything is loaded (a bundle's load and warm-up take seconds to minutes). The socket
    is bound as uvicorn binds it (SO_REUSEADDR, so a port in TIME_WAIT is not called busy) and closed."""
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise UserError(f"--host {host}: not a name or address this machine can listen on ({e}); give e.g. 127.0.0.1, or 0.0.0.0 for all interfaces") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UserError(f"--port {port}: {host}:{port} is already in use (another server?); stop it or give another --port") from None
            if e.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                raise UserError(f"--host {host}: not an address of this machine ({e.strerror}); give e.g. 127.0.0.1, or 0.0.0.0 for all interfaces") from None
            if e.errno == errno.EACCES:
                raise UserError(f"--port {port}: not allowed to listen on {host}:{port} ({e.strerror}); give a port above 1023") from None
            raise UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None


def serve(
    bundle: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    max_concurrency: Optional[int] = None,
    max_upload_mb: Optional[float] = None,
    log_level: str = "info",
    refine: Optional[str] = None,
    max_refinement_km: Optional[float] = None,
    precision: Optional[str] = None,
    device: Optional[str] = None,
) -> None:
    """Load the bundle (refusing a bundle with missing or mismatched parts), then run uvicorn.

    With `workers > 1` each worker process loads its own copy of the model (uvicorn's factory
    mode) and maps the gallery index read-only, so the workers share one copy of it in the page
    cache; the parent checks the bundle first so a broken one fails here, not in every worker.
    On SIGTERM, requests in flight get `graceful_shutdown_s` (PIGEON_GRACEFUL_SHUTDOWN_S, 5) to
    finish before they are cancelled, so a stalled client cannot keep the process alive.
    """
    import logging
    import os

    import uvicorn

    from pigeon.api import Settings, create_app
    from pigeon.api.logs import configure_logging

    if workers < 1:
        raise UserError(f"--workers {workers}: give 1 or more")
    if not 0 < port < 65536:
        raise UserError(f"--port {port}: give a TCP port between 1 and 65535")
    if max_upload_mb is not None and not max_upload_mb > 0:
        raise UserError(f"--max-upload-mb {max_upload_mb}: give a size in MB > 0")
    overrides = {
        "max_concurrency": max_concurrency,
        "max_upload_bytes": int(max_upload_mb * 1024 * 1024) if max_upload_mb is not None else None,
        "refine": refine,
        "max_refinement_km": max_refinement_km,
        "precision": precision,
        "device": device,
    }
    settings = Settings.from_env(**overrides)  # every setting checked once, here (UserError), rather than in every worker
    check_bindable(host, port)  # before the bundle loads: a busy port is one line, not a load, a warm-up and a traceback
    configure_logging(getattr(logging, log_level.upper(), logging.INFO))
    if workers == 1:
        app = create_app(bundle, settings)
        logging.getLogger("pigeon.api").info(f"serving bundle {bundle} on http://{host}:{port}/ (docs at /docs)")
        uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False, timeout_graceful_shutdown=settings.graceful_shutdown_s)
        return
    from pigeon.bundle import Bundle

    b = Bundle(bundle)
    b.require("cells", "head")  # fail here, once, rather than in every worker
    b.verify()  # hashed once here; the workers find the parts in .verified.json
    os.environ["PIGEON_BUNDLE"] = str(bundle)
    for k, v in overrides.items():
        if v is not None:
            os.environ[f"PIGEON_{k.upper()}"] = str(v)
    uvicorn.run("pigeon.api.app:app_from_env", factory=True, host=host, port=port, workers=workers, log_level=log_level, access_log=False,
                timeout_graceful_shutdown=settings.graceful_shutdown_s)


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve_cmd(
        bundle: Path = typer.Option(..., "--bundle", help="bundle folder (cells, head, optionally index/gallery/clusters)"),
        host: str = typer.Option("127.0.0.1", help="interface to listen on (0.0.0.0 for all)"),
        port: int = typer.Option(8000, help="TCP port"),
        workers: int = typer.Option(1, help="worker processes (each loads the bundle)"),
        max_concurrency: Optional[int] = typer.Option(None, help="inferences at once per worker (default 1; env PIGEON_MAX_CONCURRENCY)"),
        max_upload_mb: Optional[float] = typer.Option(None, help="largest request body in MB (default 20; env PIGEON_MAX_UPLOAD_BYTES)"),
        log_level: str = typer.Option("info", help="debug | info | warning | error"),
        refine: Optional[str] = typer.Option(None, "--refine", help="gallery refinement: cluster+nn | cluster | nn | none (env PIGEON_REFINE); default: the bundle's validated mode, else cluster+nn"),
        max_refinement_km: Optional[float] = typer.Option(None, "--max-refinement-km", help="PIGEON's guard in km (default 1000; inf = off; env PIGEON_MAX_REFINEMENT_KM)"),
        precision: Optional[str] = typer.Option(None, "--precision", help="backbone forwards: fp32 | bf16 | fp16 (env PIGEON_PRECISION; default auto: bf16 on CUDA, fp32 on CPU)"),
        device: Optional[str] = typer.Option(None, "--device", help="torch device of the model: cpu | cuda | cuda:N (env PIGEON_DEVICE; default: cuda when there is one, else cpu)"),
    ) -> None:
        """Serve POST /locate and the web page at http://HOST:PORT/ (API key: env PIGEON_API_KEY)."""
        serve(bundle, host=host, port=port, workers=workers, max_concurrency=max_concurrency, max_upload_mb=max_upload_mb, log_level=log_level,
              refine=refine, max_refinement_km=max_refinement_km, precision=precision, device=device)
