"""``leuko serve``: the lab service (HTTP API + review page) for one trained model.

Typical use::

    from leuko.serve import serve
    serve("runs/demo", host="127.0.0.1", port=8000)   # blocks; Ctrl-C stops it

or, to embed or test the app::

    from leuko.serve import create_app
    app = create_app("runs/demo/model.onnx")
"""

from __future__ import annotations

from leuko.serve.app import Service, create_app, load_service
from leuko.serve.server import serve
from leuko.serve.uploads import UploadLimits

__all__ = ["Service", "UploadLimits", "create_app", "load_service", "serve"]
