"""Running the app on uvicorn: loopback unless told otherwise, one process, one model.

One worker process on purpose: the model is loaded once and the micro-batcher
only helps when every request reaches the same queue. Concurrency comes from
the event loop (uploads) and the inference thread (the model), not from
forking copies of the model that would fight over two cores.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from pathlib import Path
from typing import Callable

from leuko.errors import LeukoError
from leuko.serve.uploads import UploadLimits

log = logging.getLogger("leuko.serve")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_free(host: str, port: int) -> None:
    """Fail with one line before loading the model if the address is taken or not ours."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise LeukoError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another --port or --host") from None


def serve(
    model: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: UploadLimits | None = None,
    max_batch: int = 32,
    echo: Callable[[str], None] = print,
) -> None:
    """Load ``model`` once and serve it until interrupted (blocks).

    Raises:
        LeukoError: a bad port, or a model that cannot be loaded (before anything listens).
    """
    import uvicorn

    from leuko.serve.app import create_app

    if not 0 <= port <= 65535:
        raise LeukoError(f"--port must be between 0 and 65535; got {port}")
    _check_free(host, port)
    app = create_app(model, limits=limits, max_batch=max_batch)
    svc = app.state.service
    shown = f"[{host}]" if ":" in host else host
    echo(f"serving {svc.model_file} ({svc.backend}, {len(svc.classes)} classes) at http://{shown}:{port}/  (Ctrl-C stops)")
    if not is_loopback(host):
        echo(f"warning: listening on {host}, not loopback: anyone who can reach this machine can use the service (no login)")
    uvicorn.run(app, host=host, port=port, log_level="info", workers=1, server_header=False)
