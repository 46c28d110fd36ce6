"""API tokens for programs (DICOMweb clients: scripts, Slicer, MONAI Label, a separately hosted OHIF).

A token is 32 random bytes (URL-safe base64 behind the prefix "m3t_"), shown once when it is made;
the index keeps only its SHA-256 (table `api_tokens`, revision viewer_0003). A random secret of
that size needs no slow hash: nobody can guess one, and the hash of a stolen index opens nothing.
A program sends it as `Authorization: Bearer m3t_...`. Scope "read": QIDO-RS and WADO-RS;
"write": STOW-RS too. A token is refused once revoked or past its expiry; the caller is never told
which (one 401 for every refusal). No HTTP here.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import text

from archive.index import Index

SCOPES = ("read", "write")
PREFIX = "m3t_"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")   # never "." or "..": a path segment
MAX_DAYS = 3650
USE_RECORDED = 60.0             # a token's last use is written at most this often (seconds)

_TOKEN = text("SELECT name, token_hash, scope, expires_at, revoked_at, last_used FROM api_tokens "
              "WHERE token_hash = :token_hash")
_BY_NAME = text("SELECT revoked_at, expires_at FROM api_tokens WHERE name = :name")
_ADD = text("INSERT INTO api_tokens (name, token_hash, scope, created_at, expires_at) "
            "VALUES (:name, :token_hash, :scope, :now, :expires_at)")
_DROP = text("DELETE FROM api_tokens WHERE name = :name")
_USED = text("UPDATE api_tokens SET last_used = :now WHERE name = :name")
_REVOKE = text("UPDATE api_tokens SET revoked_at = :now WHERE name = :name AND revoked_at IS NULL")
_LIST = text("SELECT name, scope, created_at, expires_at, revoked_at, last_used FROM api_tokens ORDER BY name")


class TokenError(ValueError):
    """A token cannot be made as asked."""


@dataclass(frozen=True)
class Token:
    name: str
    scope: str

    @property
    def who(self) -> str:
        return f"token:{self.name}"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create(index: Index, name: str, scope: str, days: float | None = None, now: float | None = None) -> str:
    """A new token named `name` (the token itself: shown once, never stored). A name in use by a live
    token is refused; one whose token was revoked or has run out is given the new token."""
    if not _NAME.match(name):
        raise TokenError(f"token name {name!r}: 1-64 letters, digits, '.', '_', '@' or '-', starting with a letter "
                         "or digit")
    if scope not in SCOPES:
        raise TokenError(f"scope {scope!r}: one of {', '.join(SCOPES)}")
    if days is not None and not 0 < days <= MAX_DAYS:
        raise TokenError(f"--days: between 0 and {MAX_DAYS}")
    now = time.time() if now is None else now
    token = PREFIX + secrets.token_urlsafe(32)
    with index.write() as conn:
        old = conn.execute(_BY_NAME, {"name": name}).first()
        if old is not None:
            if old.revoked_at is None and (old.expires_at is None or old.expires_at > now):
                raise TokenError(f"a live token is named {name!r}: revoke it first (`m3dicom token revoke {name}`) "
                                 "or choose another name")
            conn.execute(_DROP, {"name": name})
        conn.execute(_ADD, {"name": name, "token_hash": _digest(token), "scope": scope, "now": now,
                            "expires_at": now + days * 86400 if days is not None else None})
    return token


def check(index: Index, token: str | None, now: float | None = None) -> Token | None:
    """The live token sent (its last use recorded), or None: unknown, revoked, expired or malformed alike."""
    if not token or len(token) > 200 or not token.isascii() or not token.startswith(PREFIX):
        return None
    now = time.time() if now is None else now
    digest = _digest(token)
    with index.reader() as conn:
        row = conn.execute(_TOKEN, {"token_hash": digest}).first()
    if row is None or not hmac.compare_digest(row.token_hash, digest):
        return None
    if row.revoked_at is not None or (row.expires_at is not None and now >= row.expires_at):
        return None
    if row.last_used is None or now - row.last_used > USE_RECORDED:
        with index.write() as conn:
            conn.execute(_USED, {"now": now, "name": row.name})
    return Token(row.name, row.scope)


def revoke(index: Index, name: str) -> bool:
    """The token no longer opens anything, from its next request on; False: no live token of that name."""
    with index.write() as conn:
        return bool(conn.execute(_REVOKE, {"now": time.time(), "name": name}).rowcount)


def listed(index: Index) -> list[dict]:
    """Every token (never the token itself): name, scope, created, expires, revoked, last used."""
    with index.reader() as conn:
        return [dict(row) for row in conn.execute(_LIST).mappings()]
