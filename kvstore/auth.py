"""Bearer-token authentication and tenant isolation for the KVStream service.

A token file maps tokens to tenants: the namespaces a token may touch (``*`` = all, which also allows
``Stat`` of the whole store) and an optional byte quota per namespace. Two formats are accepted:

YAML::

    tokens:
      - token: "a-long-random-secret"      # or  sha256: "<64 hex digits>"  (keeps secrets out of the file)
        namespaces: [team-a, shared]
        quota_bytes: 10GiB                 # optional; 0 = unlimited
        name: team-a                       # optional label for logs (default: digest prefix)

or one entry per line (``#`` starts a comment)::

    TOKEN-or-sha256:HEX  NAMESPACE[,NAMESPACE...]  [QUOTA]

Tokens are kept only as SHA-256 digests and compared with ``hmac.compare_digest`` against every entry,
so neither the file contents in memory nor the comparison time reveal a valid token.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kvstore.backends import parse_size

WILDCARD = "*"
MIN_TOKEN_CHARS = 16  # shorter secrets are guessable; reject them at load time
_DIGEST_PREFIX = "sha256:"


def token_digest(token: str) -> bytes:
    """SHA-256 digest (32 bytes) of a plaintext token."""
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class Tenant:
    """What one token may do. ``quota_bytes`` caps each of its namespaces (0 = unlimited)."""

    name: str
    namespaces: frozenset[str]
    quota_bytes: int = 0

    def allows(self, namespace: str) -> bool:
        """True if the token may touch ``namespace``; ``"*"`` (whole store) only for wildcard tokens."""
        return WILDCARD in self.namespaces or namespace in self.namespaces


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` metadata entry, or None."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        text = value.decode() if isinstance(value, bytes) else str(value)
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


class TokenTable:
    """The tenants of a token file, looked up by token digest."""

    def __init__(self, entries: Sequence[tuple[bytes, Tenant]], allow_empty: bool = False) -> None:
        # At startup an empty table is a mistake; on reload it is how the last token is revoked.
        if not entries and not allow_empty:
            raise ValueError("the token table is empty: every request would be rejected")
        digests = [d for d, _ in entries]
        if len(set(digests)) != len(digests):
            raise ValueError("the same token appears twice in the token table")
        self._entries = list(entries)

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, token: str) -> Tenant | None:
        """The tenant of ``token``; compares against every entry (no early exit) in constant time each."""
        digest = token_digest(token)
        found: Tenant | None = None
        for known, tenant in self._entries:
            if hmac.compare_digest(known, digest):
                found = tenant
        return found

    def authenticate(self, metadata: Iterable[tuple[str, Any]] | None) -> Tenant | None:
        """The tenant of the request's bearer token, or None (missing, malformed or unknown token)."""
        token = bearer_token(metadata)
        return None if token is None else self.lookup(token)

    @classmethod
    def from_file(cls, path: str | Path, allow_empty: bool = False) -> TokenTable:
        """Load a token file (YAML or line format, see the module docstring); raises ``ValueError``."""
        text = Path(path).read_text()
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError:
            data = None  # "token ns" lines are not always valid YAML
        if isinstance(data, dict):
            data = data.get("tokens")
            if not isinstance(data, list):
                raise ValueError(f"token file {path}: expected 'tokens:' with a list of entries")
        if isinstance(data, list):
            entries = [_entry(item, f"{path}: entry {i + 1}") for i, item in enumerate(data)]
        else:
            entries = []
            for n, line in enumerate(text.splitlines(), 1):
                fields = line.split("#", 1)[0].split()
                if not fields:
                    continue
                if len(fields) not in (2, 3):
                    raise ValueError(f"{path}:{n}: expected 'TOKEN NAMESPACE[,NAMESPACE...] [QUOTA]'")
                entries.append(_line_entry(fields, f"{path}:{n}"))
        return cls(entries, allow_empty)


def _digest_of(token: str, where: str) -> bytes:
    if token.startswith(_DIGEST_PREFIX):
        hexdigest = token[len(_DIGEST_PREFIX) :]
        try:
            digest = bytes.fromhex(hexdigest)
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise ValueError(f"{where}: sha256: needs 64 hex digits")
        return digest
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"{where}: token shorter than {MIN_TOKEN_CHARS} characters")
    return token_digest(token)


def _tenant(
    digest: bytes, namespaces: Iterable[str], quota: Any, name: str, where: str
) -> tuple[bytes, Tenant]:
    spaces = frozenset(str(ns).strip() for ns in namespaces)
    if not spaces or "" in spaces:
        raise ValueError(f"{where}: needs at least one non-empty namespace (or '*')")
    try:
        quota_bytes = parse_size(quota) if isinstance(quota, str) else int(quota)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: bad quota_bytes {quota!r} ({e})") from None
    if quota_bytes < 0:
        raise ValueError(f"{where}: quota_bytes must be >= 0")
    return digest, Tenant(name or digest.hex()[:8], spaces, quota_bytes)


def _entry(item: Any, where: str) -> tuple[bytes, Tenant]:
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected a mapping with token/sha256 and namespaces")
    unknown = set(item) - {"token", "sha256", "namespaces", "quota_bytes", "name"}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
    if ("token" in item) == ("sha256" in item):
        raise ValueError(f"{where}: give exactly one of token or sha256")
    secret = str(item["token"]) if "token" in item else _DIGEST_PREFIX + str(item["sha256"])
    spaces = item.get("namespaces")
    if isinstance(spaces, str):
        spaces = spaces.split(",")
    if not isinstance(spaces, list):
        raise ValueError(f"{where}: namespaces must be a list")
    return _tenant(
        _digest_of(secret, where), spaces, item.get("quota_bytes", 0), str(item.get("name", "")), where
    )


def _line_entry(fields: Sequence[str], where: str) -> tuple[bytes, Tenant]:
    quota = fields[2] if len(fields) == 3 else 0
    return _tenant(_digest_of(fields[0], where), fields[1].split(","), quota, "", where)
