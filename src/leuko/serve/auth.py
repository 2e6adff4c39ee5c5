"""Who may use the service: bearer tokens, one per reviewer, kept in a file as hashes only.

The tokens file (``leuko serve --auth FILE``) has one line per reviewer::

    # leuko tokens: sha256 of the token, then the reviewer's name
    sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 Ann Smith

A token is a random secret (``secrets.token_urlsafe(32)``), so a plain
SHA-256 of it is as good as a slow password hash and costs nothing per
request. Make one with::

    python -m leuko.serve.auth FILE "Ann Smith"     # appends the line, prints the token once

With ``--auth`` every request but the page's own static files needs
``Authorization: Bearer TOKEN``; the token names the reviewer, and every event
the store records carries that name, so a request body cannot say who did it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, MutableMapping

from leuko.errors import LeukoError

PREFIX = "sha256:"
_LINE = re.compile(r"^sha256:([0-9a-f]{64})\s+(\S.*)$")


def is_open_path(path: str) -> bool:
    """The page's HTML, JS and CSS: shipped files with no data, which a browser fetches without a header."""
    return path == "/" or path.startswith("/static/")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class TokenAuth:
    """Reviewers by token hash."""

    reviewers: dict[str, str]
    """sha256 hex of a token -> the reviewer it names."""
    source: Path | None = None

    @classmethod
    def load(cls, path: str | Path) -> "TokenAuth":
        """Read a tokens file.

        Raises:
            LeukoError: the file is missing, a line is not ``sha256:HEX NAME`` (a plain token
                is refused: tokens are stored hashed), or no reviewer is listed.
        """
        p = Path(path).expanduser()
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise LeukoError(f"--auth: no tokens file {p} (make one with: python -m leuko.serve.auth {p} NAME)") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise LeukoError(f"--auth: cannot read {p} ({exc})") from None
        reviewers: dict[str, str] = {}
        for i, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            m = _LINE.match(line)
            if m is None:
                raise LeukoError(f"--auth {p}, line {i}: expected 'sha256:<64 hex digits> NAME' (tokens are stored "
                                 f"hashed; add one with: python -m leuko.serve.auth {p} NAME)")
            digest, name = m.group(1), m.group(2).strip()
            if len(name) > 100 or not name.isprintable():
                raise LeukoError(f"--auth {p}, line {i}: a reviewer name must be 1-100 printable characters")
            if digest in reviewers:
                raise LeukoError(f"--auth {p}, line {i}: the same token is listed twice")
            reviewers[digest] = name
        if not reviewers:
            raise LeukoError(f"--auth {p}: no tokens in the file (add one with: python -m leuko.serve.auth {p} NAME)")
        return cls(reviewers, p)

    def reviewer(self, token: str) -> str | None:
        """The reviewer a token names, or ``None`` (compared in constant time against every entry)."""
        digest = token_hash(token)
        found = None
        for known, name in self.reviewers.items():
            if hmac.compare_digest(known, digest):
                found = name
        return found


def add_token(path: str | Path, name: str) -> str:
    """Append a new reviewer to a tokens file (created if missing) and return the token (shown once, never stored)."""
    name = name.strip()
    if not name or len(name) > 100 or not name.isprintable():
        raise LeukoError("a reviewer name must be 1-100 printable characters")
    p = Path(path).expanduser()
    token = secrets.token_urlsafe(32)
    existing = p.read_text(encoding="utf-8") if p.is_file() else "# leuko tokens: sha256 of the token, then the reviewer's name\n"
    if existing and not existing.endswith("\n"):
        existing += "\n"
    p.write_text(existing + f"{PREFIX}{token_hash(token)} {name}\n", encoding="utf-8")
    try:
        p.chmod(0o600)
    except OSError:
        pass
    return token


class BearerAuth:
    """ASGI middleware: every request but the page's static files needs a valid bearer token.

    The reviewer the token names is put in ``request.state.reviewer``; a missing or
    unknown token is answered 401 with one line, before the app sees the request.
    """

    def __init__(self, app: Any, auth: TokenAuth) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if is_open_path(path):
            await self.app(scope, receive, send)
            return
        header = ""
        for key, value in scope.get("headers", []):
            if key == b"authorization":
                header = value.decode("latin-1")
                break
        scheme, _, token = header.partition(" ")
        if not header:
            await _refuse(send, "this service needs a reviewer's token: send 'Authorization: Bearer TOKEN'")
            return
        if scheme.lower() != "bearer" or not token.strip():
            await _refuse(send, "the Authorization header must be 'Bearer TOKEN'")
            return
        who = self.auth.reviewer(token.strip())
        if who is None:
            await _refuse(send, "unknown token: it names no reviewer of this service")
            return
        scope.setdefault("state", {})["reviewer"] = who
        await self.app(scope, receive, send)


async def _refuse(send: Send, message: str) -> None:
    body = json.dumps({"detail": message}).encode()
    await send({"type": "http.response.start", "status": 401, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"www-authenticate", b'Bearer realm="leuko"')]})
    await send({"type": "http.response.body", "body": body})


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - exercised by hand
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] in ("-h", "--help"):
        print("usage: python -m leuko.serve.auth TOKENS_FILE REVIEWER_NAME\n"
              "appends a new token for REVIEWER_NAME (stored hashed) and prints the token once", file=sys.stderr)
        return 2
    try:
        token = add_token(args[0], args[1])
    except LeukoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(token)
    print(f"added {args[1]!r} to {args[0]}; give them the token above (it is not stored anywhere)", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
