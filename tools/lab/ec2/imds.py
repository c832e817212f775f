"""The request logic of the emulator's EC2 Instance Metadata Service, without sockets.

Models IMDS as AWS documents it in the EC2 User Guide ("Use the Instance Metadata
Service to access instance metadata" and "How Instance Metadata Service Version 2
works"):

* ``PUT /latest/api/token`` with ``X-aws-ec2-metadata-token-ttl-seconds`` (1..21600)
  issues a session token; the TTL is echoed in the response. A token request that
  carries ``X-Forwarded-For`` is refused with 403, because IMDS will not hand a token
  to something behind a proxy. A missing or malformed TTL is a 400.
* ``GET`` with ``X-aws-ec2-metadata-token`` is served while the token is valid and
  unexpired, 401 otherwise. Without the header it is 401 when IMDSv2 is required (the
  default here, and what ultranet's own client expects) and served when IMDSv1 is
  allowed.
* Paths under ``/latest/`` walk a metadata tree. A directory answers its child names,
  one per line, sub-directories suffixed with ``/``; a directory asked for without the
  trailing slash answers the same listing, a leaf asked for with one is a 404.

Deliberately not modelled: version-dated prefixes (``/2021-07-15/...``), the hop limit
(that is the namespace plumbing's job), and ``Content-Length`` (the HTTP wrapper's job).
The service is safe to call from a threading HTTP server.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import TypeAlias
from urllib.parse import unquote

TOKEN_PATH = "/latest/api/token"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
MAX_TOKEN_TTL_S = 21600  # the IMDSv2 limit: six hours

_ROOT = "/latest"
_TEXT = "text/plain"
_JSON = "application/json"
# Only plain ASCII digits: int() would also accept "+5", " 5", "1_0" and non-ASCII
# digits, none of which IMDS takes as a TTL. Five digits already exceed the maximum.
_TTL_PATTERN = re.compile(r"[0-9]{1,5}")


@dataclass(frozen=True, slots=True)
class JsonLeaf:
    """A leaf served as a JSON document, such as ``dynamic/instance-identity/document``."""

    document: Mapping[str, object]


MetadataNode: TypeAlias = "str | int | Sequence[str] | JsonLeaf | Mapping[str, MetadataNode]"
MetadataTree: TypeAlias = Mapping[str, MetadataNode]


@dataclass(frozen=True, slots=True)
class ImdsResponse:
    status: int
    headers: dict[str, str]
    body: bytes


class ImdsService:
    """Answers IMDS requests for one instance from a tree read afresh on every request.

    ``tree()`` returns what lives under ``/latest/`` (keys such as ``meta-data`` and
    ``dynamic``). It is called once per metadata read, because the cloud behind it
    changes (ENIs attached, prefixes assigned) and may deliberately lag behind EC2. It
    must not raise: an instance that vanished is the caller's to model, for example as
    an empty tree, so that a bug in the provider is not mistaken for a 404.
    """

    def __init__(
        self,
        tree: Callable[[], MetadataTree],
        *,
        clock: Callable[[], float] = time.monotonic,
        v1_allowed: bool = False,
        max_token_ttl_s: int = MAX_TOKEN_TTL_S,
    ) -> None:
        if not 1 <= max_token_ttl_s <= MAX_TOKEN_TTL_S:
            raise ValueError(
                f"max_token_ttl_s must be 1..{MAX_TOKEN_TTL_S} as on EC2, not {max_token_ttl_s}"
            )
        self._tree = tree
        self._clock = clock
        # Public and mutable because EC2 lets ModifyInstanceMetadataOptions change
        # HttpTokens on a running instance.
        self.v1_allowed = v1_allowed
        self._max_token_ttl_s = max_token_ttl_s
        self._token_expiry: dict[str, float] = {}
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()

    def handle(self, method: str, path: str, headers: Mapping[str, str]) -> ImdsResponse:
        """The response to one request; ``path`` may carry a query string, which is ignored."""
        path = unquote(path.split("?", 1)[0].split("#", 1)[0])
        # HTTP header names are case-insensitive; clients send these in every spelling.
        by_name = {name.lower(): value for name, value in headers.items()}
        with self._lock:
            self.requests[path] += 1

        if path == TOKEN_PATH:
            if method != "PUT":
                return _error(HTTPStatus.METHOD_NOT_ALLOWED, {"Allow": "PUT"})
            return self._issue_token(by_name)
        if method not in ("GET", "HEAD"):
            return _error(HTTPStatus.METHOD_NOT_ALLOWED, {"Allow": "GET, HEAD"})
        # Authorisation comes before the path, as on EC2: without a token even a
        # nonexistent key is a 401, so probing reveals nothing.
        if not self._authorised(by_name.get(TOKEN_HEADER.lower())):
            return _error(HTTPStatus.UNAUTHORIZED)
        response = self._read(path)
        if method == "HEAD":
            return ImdsResponse(response.status, response.headers, b"")
        return response

    def revoke_tokens(self) -> None:
        """Invalidate every session token, so clients must fetch a new one."""
        with self._lock:
            self._token_expiry.clear()

    def _issue_token(self, headers: Mapping[str, str]) -> ImdsResponse:
        if "x-forwarded-for" in headers:
            return _error(HTTPStatus.FORBIDDEN)
        ttl_text = headers.get(TOKEN_TTL_HEADER.lower())
        if ttl_text is None:
            return _error(HTTPStatus.BAD_REQUEST)
        ttl_text = ttl_text.strip()  # optional whitespace around a field value is not part of it
        if not _TTL_PATTERN.fullmatch(ttl_text):
            return _error(HTTPStatus.BAD_REQUEST)
        ttl_s = int(ttl_text)
        if not 1 <= ttl_s <= self._max_token_ttl_s:
            return _error(HTTPStatus.BAD_REQUEST)

        token = secrets.token_urlsafe(42)
        now = self._clock()
        with self._lock:
            # Expired tokens are dropped here so that a client that asks for a token per
            # request cannot grow the store beyond what is alive within one TTL.
            for stale in [t for t, expiry in self._token_expiry.items() if expiry <= now]:
                del self._token_expiry[stale]
            self._token_expiry[token] = now + ttl_s
        return ImdsResponse(
            int(HTTPStatus.OK),
            {**_base_headers(_TEXT), TOKEN_TTL_HEADER: str(ttl_s)},
            token.encode("ascii"),
        )

    def _authorised(self, token: str | None) -> bool:
        if token is None:
            return self.v1_allowed
        # A token that is sent is checked even when IMDSv1 is allowed, as on EC2.
        now = self._clock()
        with self._lock:
            expiry = self._token_expiry.get(token)
            if expiry is None:
                return False
            if expiry <= now:
                del self._token_expiry[token]
                return False
            return True

    def _read(self, path: str) -> ImdsResponse:
        if path == _ROOT:
            relative = ""
        elif path.startswith(_ROOT + "/"):
            relative = path[len(_ROOT) + 1 :]
        else:
            return _error(HTTPStatus.NOT_FOUND)

        wants_directory = relative == "" or relative.endswith("/")
        keys = relative.removesuffix("/").split("/") if relative else []
        node: MetadataNode = self._tree()
        for key in keys:
            if not isinstance(node, Mapping) or key not in node:
                return _error(HTTPStatus.NOT_FOUND)
            node = node[key]

        if isinstance(node, Mapping):
            return _ok(_listing(node).encode(), _TEXT)
        if wants_directory:
            return _error(HTTPStatus.NOT_FOUND)
        if isinstance(node, JsonLeaf):
            return _ok(_render_json(node).encode(), _JSON)
        return _ok(_render_leaf(node, path).encode(), _TEXT)


def _listing(directory: Mapping[str, MetadataNode]) -> str:
    return "\n".join(
        f"{name}/" if isinstance(child, Mapping) else name for name, child in directory.items()
    )


def _render_json(leaf: JsonLeaf) -> str:
    # EC2 pretty-prints its identity document this way ("key" : value, two-space
    # indent); clients parse it, but people read it with curl.
    return json.dumps(leaf.document, indent=2, separators=(",", " : "))


def _render_leaf(value: str | int | Sequence[str], path: str) -> str:
    if isinstance(value, str):
        return value
    # bool is an int, but "True" is not an IMDS value; the provider has a bug.
    if isinstance(value, bool):
        raise TypeError(f"IMDS leaf {path} is a bool; metadata values are strings or integers")
    if isinstance(value, int):
        return str(value)
    lines = list(value)
    for line in lines:
        if not isinstance(line, str):
            raise TypeError(f"IMDS leaf {path} has a {type(line).__name__} line; lines are str")
    return "\n".join(lines)


def _base_headers(content_type: str) -> dict[str, str]:
    return {"Server": "EC2ws", "Content-Type": content_type}


def _ok(body: bytes, content_type: str) -> ImdsResponse:
    return ImdsResponse(int(HTTPStatus.OK), _base_headers(content_type), body)


def _error(status: HTTPStatus, extra_headers: Mapping[str, str] | None = None) -> ImdsResponse:
    return ImdsResponse(
        int(status),
        {**_base_headers(_TEXT), **(extra_headers or {})},
        status.phrase.encode(),
    )
