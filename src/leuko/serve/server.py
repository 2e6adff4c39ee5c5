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
    db: str | Path | None = None,
    images: str | Path | None = None,
    auth: str | Path | None = None,
    insecure: bool = False,
    echo: Callable[[str], None] = print,
) -> None:
    """Load ``model`` once and serve it until interrupted (blocks).

    Args:
        db: the store (a SQLite file, created if missing, or a PostgreSQL URL); ``None``: keep nothing.
        images: the image store folder (default: beside a SQLite file).
        auth: a tokens file (:mod:`leuko.serve.auth`): every call then needs a reviewer's token.
        insecure: listen beyond loopback without ``auth`` anyway.

    Raises:
        LeukoError: a bad port, an address beyond loopback without ``auth`` (and without
            ``insecure``), a store or tokens file that cannot be opened, or a model that cannot
            be loaded (before anything listens).
    """
    import uvicorn

    from leuko.serve.app import create_app

    if not 0 <= port <= 65535:
        raise LeukoError(f"--port must be between 0 and 65535; got {port}")
    if not is_loopback(host) and auth is None and not insecure:
        raise LeukoError(f"refusing to listen on {host} without --auth: anyone who can reach this machine could read and "
                         "change the lab's samples; give --auth TOKENS_FILE, or --insecure to do it anyway")
    _check_free(host, port)
    app = create_app(model, limits=limits, max_batch=max_batch, store=db, images=images, auth=auth)
    svc = app.state.service
    shown = f"[{host}]" if ":" in host else host
    if app.state.store is not None:
        st = app.state.store
        echo(f"store: {st.display} (images in {st.images.root})")
    if app.state.auth is not None:
        echo(f"login: {len(app.state.auth.reviewers)} reviewer token(s) from {app.state.auth.source}")
    echo(f"serving {svc.model_file} ({svc.backend}, {len(svc.classes)} classes) at http://{shown}:{port}/  (Ctrl-C stops)")
    if not is_loopback(host) and auth is None:
        echo(f"warning: listening on {host}, not loopback, with no login (--insecure): anyone who can reach this machine "
             "can use the service")
    uvicorn.run(app, host=host, port=port, log_level="info", workers=1, server_header=False)
