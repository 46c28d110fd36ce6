"""People, sessions, share links and the audit trail, in the index. No HTTP here.

- Passwords: scrypt (memory-hard: n=2^15, r=8, p=1, 32 MiB), a random salt each.
- Sessions: a random token in an HttpOnly cookie; the index keeps only its SHA-256, so a
  copy of the index opens no session. Each has a CSRF token, an idle and an absolute limit.
- Failed logins are counted per user name and per address; the answer is slowed down
  (doubling, up to 8 s) and is the same whatever was wrong. Attempts in flight are counted
  too (logins.py): parallel attempts are checked one after another, each after its delay.
- Share links: a random id and its expiry, signed (HMAC-SHA256) with the viewer's secret,
  kept in the index so they can be revoked; a share session sees one study, read-only. The
  secret is in the index too, wrapped by the node's keys (`shared_secret`): every node of an
  index signs and checks links alike, and the index alone signs none.

These tables (users, sessions, login_failures, share_links, audit, viewer_secret) are the viewer's own: its Alembic
revisions (viewer/migrations/, applied by `migrate(index)`) make them, on SQLite or PostgreSQL, and no
other package reads them.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import logging
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import text

from archive import db
from archive.crypto import KMS_PREFIX, IntegrityError, Keyring
from archive.index import Index

log = logging.getLogger(__name__)
ROLES = ("reader", "clinician", "admin")       # what each may do: viewer/roles.py
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")   # never "." or "..": a path segment
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 15, 8, 1
MAX_DELAY = 8.0


class AccountError(ValueError):
    """A user cannot be made or changed as asked."""


class UserExists(AccountError):
    """A new user's name is taken."""


# -- the viewer's tables: Alembic (viewer/migrations/, branch "viewer"), one copy of each query ----------

MIGRATIONS = Path(__file__).with_name("migrations")
TABLES = ("users", "sessions", "login_failures", "share_links", "audit")

_USER_EXISTS = text("SELECT 1 FROM users WHERE name = :name")
_PUT_USER = text("INSERT INTO users (name, role, password, created_at, referring) "
                 "VALUES (:name, :role, :password, :now, :referring) ON CONFLICT (name) DO UPDATE "
                 "SET role = excluded.role, password = excluded.password, referring = excluded.referring, disabled = 0")
_ADD_USER = text("INSERT INTO users (name, role, password, created_at, referring) "
                 "VALUES (:name, :role, :password, :now, :referring) ON CONFLICT (name) DO NOTHING")
_USERS = text("SELECT name, role, disabled FROM users ORDER BY name")
_USER_ROWS = text("SELECT u.name, u.role, u.referring, u.disabled, u.created_at, COUNT(s.token_hash) AS sessions, "
                  "MAX(s.last_seen) AS last_seen FROM users u LEFT JOIN sessions s ON s.user_name = u.name "
                  "AND s.expires_at >= :now AND s.last_seen >= :idle_since "
                  "GROUP BY u.name, u.role, u.referring, u.disabled, u.created_at "
                  "ORDER BY u.name")
_SET_PASSWORD = text("UPDATE users SET password = :password WHERE name = :name")
_SET_ROLE = text("UPDATE users SET role = :role, referring = :referring WHERE name = :name")
_ENABLE = text("UPDATE users SET disabled = 0 WHERE name = :name")
_COUNT_ADMINS = text("SELECT COUNT(*) FROM users WHERE role = 'admin' AND disabled = 0 AND name != :name")
_COUNT_USERS = text("SELECT COUNT(*) FROM users WHERE disabled = 0")
_FAILURES = text("SELECT count, last FROM login_failures WHERE key IN (:user_key, :address_key)")
_USER = text("SELECT name, role, password, disabled, referring FROM users WHERE name = :name")
_OWN_FAILURES = text("SELECT count FROM login_failures WHERE key = :key AND :now - last <= 900")
_FORGET_FAILURES = text("DELETE FROM login_failures WHERE key = :key")
_FORGIVE = text("UPDATE login_failures SET count = CASE WHEN count > :own THEN count - :own ELSE 0 END "
                "WHERE key = :key")
_FAILED = text("INSERT INTO login_failures (key, count, last) VALUES (:key, 1, :now) ON CONFLICT (key) DO UPDATE "
               "SET count = CASE WHEN :now - login_failures.last > 900 THEN 1 ELSE login_failures.count + 1 END, "
               "last = excluded.last")
_OPEN_SESSION = text(
    "INSERT INTO sessions (token_hash, user_name, share_id, study_uid, csrf, created_at, last_seen, expires_at) "
    "VALUES (:token_hash, :user_name, :share_id, :study_uid, :csrf, :now, :now, :expires_at)")
_EXPIRED_SESSIONS = text("DELETE FROM sessions WHERE expires_at < :now")
_SESSION = text("SELECT s.token_hash, s.user_name, s.share_id, s.study_uid, s.csrf, s.last_seen, s.expires_at, "
                "u.role, u.disabled, u.referring FROM sessions s LEFT JOIN users u ON u.name = s.user_name "
                "WHERE s.token_hash = :token_hash")
_SEEN = text("UPDATE sessions SET last_seen = :now WHERE token_hash = :token_hash")
_SESSION_SHARE = text("SELECT l.revoked_at, l.expires_at FROM sessions s JOIN share_links l ON l.id = s.share_id "
                      "WHERE s.token_hash = :token_hash")
_CLOSE_SESSION = text("DELETE FROM sessions WHERE token_hash = :token_hash")
_ADD_SHARE = text("INSERT INTO share_links (id, study_uid, created_by, created_at, expires_at) "
                  "VALUES (:id, :study_uid, :created_by, :now, :expires_at)")
_SHARE_STUDY = text("SELECT study_uid FROM share_links WHERE id = :id")
_SHARE = text("SELECT id, study_uid, created_by, expires_at, revoked_at FROM share_links WHERE id = :id")
_REVOKE = text("UPDATE share_links SET revoked_at = :now WHERE id = :id AND revoked_at IS NULL")
_DISABLE = text("UPDATE users SET disabled = 1 WHERE name = :name")
_END_SESSIONS = text("DELETE FROM sessions WHERE user_name = :name")
_SHARES = text("SELECT id, created_by, created_at, expires_at, revoked_at FROM share_links "
               "WHERE study_uid = :study_uid ORDER BY created_at DESC")
_AUDIT = text("INSERT INTO audit (time, user_name, action, study_uid, outcome, detail, address) "
              "VALUES (:now, :who, :action, :study_uid, :outcome, :detail, :address)")


def _legacy(conn) -> bool:
    """An index from before Alembic: the viewer's sqlite-utils migration 0001_accounts (or the archive's
    0005_viewer before issue 16) made all of its tables at once, with the schema of viewer_0001: stamp it."""
    names = ",".join("?" * len(TABLES))
    made = {r[0] for r in conn.execute(f"SELECT name FROM sqlite_master WHERE type = 'table' AND name IN ({names})",
                                       TABLES)}
    if made and made != set(TABLES):
        raise RuntimeError(f"the index has the viewer's tables {sorted(made)} but not "
                           f"{sorted(set(TABLES) - made)}: it was changed by hand; restore it from a backup")
    return bool(made)


def migrate(index: Index) -> None:
    """Make the viewer's tables in `index`, or bring them up to date: the node calls this at its
    start, `m3dicom user add` before the first start, and a test that makes an index itself."""
    db.migrate(index.engines, "viewer", MIGRATIONS, _legacy)


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, maxmem=64 << 20,
                            dklen=32)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


def check_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
    except ValueError:
        return False
    if scheme != "scrypt":
        return False
    candidate = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p),
                               maxmem=64 << 20, dklen=len(digest) // 2)
    return hmac.compare_digest(candidate.hex(), digest)


@functools.lru_cache(maxsize=1)
def _dummy_hash() -> str:
    """Checked against when the user does not exist: wrong names take as long as wrong passwords."""
    return hash_password(secrets.token_hex(8))


@dataclass(frozen=True)
class User:
    name: str
    role: str
    referring: str | None = None      # a reader's: the Referring Physician's Name of their studies


_OLD_NAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")     # a name made before the first character had to be one


def check_user(name: str, password: str, role: str, referring: str | None = None, new: bool = True) -> None:
    """AccountError when the name, password or role cannot be an account's (an existing account, `new`
    False, keeps a name that an older version took)."""
    if not (_NAME if new else _OLD_NAME).match(name):
        raise AccountError(f"user name {name!r}: 1-64 letters, digits, '.', '_', '@' or '-', starting with a letter "
                           "or digit")
    check_role(role, referring)
    check_new_password(password)


def check_new_password(password: str) -> None:
    if len(password) < 10:
        raise AccountError("the password needs at least 10 characters")
    if len(password) > 1024:
        raise AccountError("the password is longer than 1024 characters")


MAX_NAMES = 8            # the names a reader's physician goes by (FAMILY^GIVEN\\FAMILY^GIVEN^^DR.)


def check_role(role: str, referring: str | None) -> None:
    """A reader needs the Referring Physician's Name of their studies: a DICOM person name (FAMILY^GIVEN, at
    most 64 characters), or a few separated by backslashes, as C-FIND takes a list; `*` and `?` are
    wildcards, never first (`*A*` would be most physicians'). The other roles take none."""
    if role not in ROLES:
        raise AccountError(f"role {role!r}: one of {', '.join(ROLES)}")
    if role == "reader":
        if not referring or not referring.strip("*?^\\ "):
            raise AccountError("a reader sees the studies of one referring physician: give their name "
                               "(FAMILY^GIVEN; a name of wildcards alone would be everyone's)")
        names = referring.split("\\")
        if len(names) > MAX_NAMES or not all(names) or not referring.isascii() or not referring.isprintable():
            raise AccountError(f"the referring physician's name: at most {MAX_NAMES} names, separated by one "
                               "backslash, printable ASCII")
        for name in names:
            if len(name) > 64 or name[0] in "*? ":
                raise AccountError(f"the referring physician's name {name[:64]!r}: at most 64 characters, not "
                                   "starting with a wildcard or a space")
    elif referring:
        raise AccountError(f"only a reader has a referring physician's name, not a {role}")


def add_user(index: Index, name: str, password: str, role: str = "clinician", replace: bool = False,
             referring: str | None = None) -> User:
    check_user(name, password, role, referring, new=not replace)
    with index.write() as conn:
        exists = conn.execute(_USER_EXISTS, {"name": name}).first() is not None
        if exists and not replace:
            raise UserExists(f"user {name!r} exists already")
        if not exists:
            check_user(name, password, role, referring)
        if exists and role != "admin" and _is_last_admin(conn, name):
            raise AccountError(f"{name} is the only enabled admin: make another admin first")
        values = {"name": name, "role": role, "password": hash_password(password), "now": time.time(),
                  "referring": referring or None}
        if not replace:            # two admins adding one name at once: the second is told, not written over
            if conn.execute(_ADD_USER, values).rowcount == 0:
                raise UserExists(f"user {name!r} exists already")
            return User(name, role, referring or None)
        conn.execute(_PUT_USER, values)
        if exists:   # a new password ends the sessions opened with the old one
            conn.execute(_END_SESSIONS, {"name": name})
    return User(name, role, referring or None)


def user_rows(index: Index, now: float | None = None, idle_minutes: float = 10 ** 6) -> list[dict]:
    """Every account with its open sessions (how many, the latest use), for the admin page; a session idle
    past `idle_minutes` is not open any more."""
    now = time.time() if now is None else now
    return [dict(r) for r in _read(index, _USER_ROWS, now=now, idle_since=now - idle_minutes * 60)]


def set_password(index: Index, name: str, password: str) -> bool:
    """A new password (an admin's reset); the account's sessions end. False: no such user."""
    check_new_password(password)
    with index.write() as conn:
        changed = conn.execute(_SET_PASSWORD, {"name": name, "password": hash_password(password)}).rowcount
        conn.execute(_END_SESSIONS, {"name": name})
    return bool(changed)


def set_role(index: Index, name: str, role: str, referring: str | None = None) -> bool:
    """Another role (and a reader's name); the account's sessions end, so that none keeps the old rights.
    The last enabled admin keeps their role (AccountError). False: no such user."""
    check_role(role, referring)
    with index.write() as conn:
        if role != "admin" and _is_last_admin(conn, name):
            raise AccountError(f"{name} is the only enabled admin: make another admin first")
        changed = conn.execute(_SET_ROLE, {"name": name, "role": role, "referring": referring or None}).rowcount
        conn.execute(_END_SESSIONS, {"name": name})
    return bool(changed)


_LOCK_ADMINS = text("SELECT pg_advisory_xact_lock(1832083812)")    # 0x6D336164, "m3ad": the last-admin rule


def _is_last_admin(conn, name: str) -> bool:
    if conn.dialect.name == "postgresql":     # two admins demoting each other at once: one after the other
        conn.execute(_LOCK_ADMINS)
    row = conn.execute(_USER, {"name": name}).first()
    return (row is not None and row.role == "admin" and not row.disabled
            and conn.execute(_COUNT_ADMINS, {"name": name}).scalar() == 0)


def enable_user(index: Index, name: str) -> bool:
    with index.write() as conn:
        return bool(conn.execute(_ENABLE, {"name": name}).rowcount)


def end_sessions(index: Index, name: str) -> int:
    """Log the user out everywhere: how many sessions ended."""
    with index.write() as conn:
        return conn.execute(_END_SESSIONS, {"name": name}).rowcount


def _read(index: Index, statement, **params) -> list:
    """The rows of one statement, by column name."""
    with index.reader() as conn:
        return conn.execute(statement, params).mappings().all()


def users(index: Index) -> list[tuple[str, str, bool]]:
    return [(r["name"], r["role"], bool(r["disabled"])) for r in _read(index, _USERS)]


def count_users(index: Index) -> int:
    return index.read(_COUNT_USERS)[0][0]


def failure_delay(index: Index, name: str, address: str) -> float:
    """Seconds to wait before answering a login attempt (grows with recent failures)."""
    rows = _read(index, _FAILURES, user_key=f"user:{name}", address_key=f"addr:{address}")
    recent = [r["count"] for r in rows if time.time() - r["last"] < 900]
    failures = max(recent, default=0)
    return 0.0 if failures == 0 else min(MAX_DELAY, 0.25 * 2 ** (failures - 1))


def authenticate(index: Index, name: str, password: str, address: str) -> User | None:
    """The user when name and password are right (counted as a failure otherwise)."""
    rows = _read(index, _USER, name=name)
    stored = rows[0]["password"] if rows else _dummy_hash()
    ok = check_password(password, stored) and bool(rows) and not rows[0]["disabled"]
    now = time.time()
    user_key, address_key = f"user:{name}", f"addr:{address}"
    with index.write() as conn:
        if ok:
            # the owner's own typos are forgiven, at the account and at the address (a shared
            # reading-room computer, a proxy); failures on other accounts from there still count
            own = conn.execute(_OWN_FAILURES, {"key": user_key, "now": now}).scalar()
            conn.execute(_FORGET_FAILURES, {"key": user_key})
            if own:
                conn.execute(_FORGIVE, {"own": own, "key": address_key})
        else:
            for key in (user_key, address_key):
                conn.execute(_FAILED, {"key": key, "now": now})
    return User(rows[0]["name"], rows[0]["role"], rows[0]["referring"]) if ok else None


# -- sessions ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Session:
    token_hash: str
    user: User | None
    study_uid: str | None        # set: a share-link session, this study only
    share_id: str | None
    csrf: str
    expires_at: float

    @property
    def is_share(self) -> bool:
        return self.user is None

    @property
    def who(self) -> str:
        return self.user.name if self.user else f"share:{self.share_id}"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def open_session(index: Index, *, user: User | None = None, share_id: str | None = None,
                 study_uid: str | None = None, hours: float, now: float | None = None) -> tuple[str, Session]:
    """(cookie token, session)."""
    now = time.time() if now is None else now
    token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(24)
    expires = now + hours * 3600
    with index.write() as conn:
        conn.execute(_OPEN_SESSION, {"token_hash": _digest(token), "user_name": user.name if user else None,
                                     "share_id": share_id, "study_uid": study_uid, "csrf": csrf, "now": now,
                                     "expires_at": expires})
        conn.execute(_EXPIRED_SESSIONS, {"now": now})
    return token, Session(_digest(token), user, study_uid, share_id, csrf, expires)


def session(index: Index, token: str | None, idle_minutes: float, now: float | None = None) -> Session | None:
    """The live session of a cookie token (its last use refreshed), or None."""
    if not token or len(token) > 200 or not token.isascii():
        return None
    now = time.time() if now is None else now
    rows = _read(index, _SESSION, token_hash=_digest(token))
    if not rows:
        return None
    row = rows[0]
    expired = now > row["expires_at"] or now - row["last_seen"] > idle_minutes * 60
    user_gone = row["user_name"] is not None and (row["role"] is None or row["disabled"])
    share_gone = row["share_id"] is not None and not share_valid(index, row["share_id"], now)
    if expired or user_gone:
        close_session(index, token)
        return None
    if share_gone:                      # kept until it expires, so that its holder is told why (closed_share)
        return None
    if now - row["last_seen"] > 30:     # refresh at most every 30 s: fewer writes
        with index.write() as conn:
            conn.execute(_SEEN, {"now": now, "token_hash": row["token_hash"]})
    user = User(row["user_name"], row["role"], row["referring"]) if row["user_name"] else None
    return Session(row["token_hash"], user, row["study_uid"], row["share_id"], row["csrf"], row["expires_at"])


def still_open(index: Index, opened: Session, idle_minutes: float, now: float | None = None) -> bool:
    """Whether a session read earlier still is open with the same rights: not closed, expired or idle, its
    user enabled with the same role and reach, its share link valid. It only reads (a notification stream
    left open, an export running, is no activity that keeps a session alive)."""
    now = time.time() if now is None else now
    rows = _read(index, _SESSION, token_hash=opened.token_hash)
    if not rows:
        return False
    row = rows[0]
    if now > row["expires_at"] or now - row["last_seen"] > idle_minutes * 60:
        return False
    if opened.user is not None:
        return (not row["disabled"] and row["role"] == opened.user.role
                and row["referring"] == opened.user.referring)
    return row["share_id"] is not None and share_valid(index, row["share_id"], now)


def closed_share(index: Index, token: str | None, now: float | None = None) -> str | None:
    """"revoked" or "expired" when the cookie's session was opened by a share link that has since
    been revoked or has run out: its holder is told so (the page "This link has been withdrawn"),
    not sent to a login page they have no account for. None for any other cookie."""
    if not token or len(token) > 200 or not token.isascii():
        return None
    rows = _read(index, _SESSION_SHARE, token_hash=_digest(token))
    if not rows:
        return None
    if rows[0]["revoked_at"] is not None:
        return "revoked"
    return "expired" if (time.time() if now is None else now) >= rows[0]["expires_at"] else None


def close_session(index: Index, token: str) -> None:
    with index.write() as conn:
        conn.execute(_CLOSE_SESSION, {"token_hash": _digest(token)})


# -- share links ---------------------------------------------------------------------------

def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _sign(secret: bytes, message: str) -> str:
    return _b64(hmac.new(secret, message.encode(), hashlib.sha256).digest())


def create_share(index: Index, secret: bytes, study_uid: str, created_by: str, days: float) -> tuple[str, float]:
    """(the link's token, its expiry)."""
    link_id, now = secrets.token_urlsafe(12), time.time()
    expires = now + days * 86400
    with index.write() as conn:
        conn.execute(_ADD_SHARE, {"id": link_id, "study_uid": study_uid, "created_by": created_by, "now": now,
                                  "expires_at": expires})
    message = f"{link_id}.{int(expires)}"
    return f"{message}.{_sign(secret, message)}", expires


def open_share(index: Index, secret: bytes, token: str, now: float | None = None) -> tuple[str, str] | None:
    """(link id, study UID) of a valid link token, or None (bad signature, unknown, expired, revoked)."""
    now = time.time() if now is None else now
    parts = token.split(".")
    if len(parts) != 3 or len(token) > 200 or not token.isascii():
        return None
    link_id, expires, signature = parts
    if not hmac.compare_digest(_sign(secret, f"{link_id}.{expires}"), signature):
        return None
    if not share_valid(index, link_id, now):
        return None
    return link_id, index.read(_SHARE_STUDY, {"id": link_id})[0][0]


def share_refusal(index: Index, secret: bytes, token: str, now: float | None = None) -> str:
    """Why a link opens nothing, for the page its holder sees: "revoked", "expired", or "invalid"
    (not a link this node made: altered, cut short, or unknown). Only a correctly signed link
    learns more than "invalid"."""
    now = time.time() if now is None else now
    parts = token.split(".")
    if len(parts) != 3 or len(token) > 200 or not token.isascii():
        return "invalid"
    link_id, expires, signature = parts
    if not hmac.compare_digest(_sign(secret, f"{link_id}.{expires}"), signature):
        return "invalid"
    link = share(index, link_id)
    if link is None:
        return "invalid"
    if link["revoked_at"] is not None:
        return "revoked"
    return "expired" if now >= link["expires_at"] else "invalid"


def share_valid(index: Index, link_id: str, now: float | None = None) -> bool:
    rows = _read(index, _SHARE, id=link_id)
    now = time.time() if now is None else now
    return bool(rows) and rows[0]["revoked_at"] is None and now < rows[0]["expires_at"]


def share(index: Index, link_id: str) -> dict | None:
    """A link's study and who made it (None: no such link)."""
    rows = _read(index, _SHARE, id=link_id)
    return dict(rows[0]) if rows else None


def revoke_share(index: Index, link_id: str) -> bool:
    """Revoke a link: its sessions open nothing from now on (`session` checks the link on every
    request); they are kept until they expire, so that their holders are told why (closed_share)."""
    with index.write() as conn:
        changed = conn.execute(_REVOKE, {"now": time.time(), "id": link_id}).rowcount
    return bool(changed)


def disable_user(index: Index, name: str, keep_an_admin: bool = True) -> bool:
    """The user can no longer log in; their sessions end now. False: no such user. The last enabled admin
    is not disabled (AccountError: nobody could administer the node) unless `keep_an_admin` is False."""
    with index.write() as conn:
        if keep_an_admin and _is_last_admin(conn, name):
            raise AccountError(f"{name} is the only enabled admin: make another admin first")
        changed = conn.execute(_DISABLE, {"name": name}).rowcount
        conn.execute(_END_SESSIONS, {"name": name})
    return bool(changed)


def shares(index: Index, study_uid: str) -> list[dict]:
    return [dict(r) for r in _read(index, _SHARES, study_uid=study_uid)]


_ALL_SHARES = text("SELECT id, study_uid, created_by, created_at, expires_at, revoked_at FROM share_links "
                   "WHERE :everything = 1 OR (revoked_at IS NULL AND expires_at > :now) "
                   "ORDER BY created_at DESC, id LIMIT :limit OFFSET :offset")


def all_shares(index: Index, open_only: bool = True, limit: int = 100, offset: int = 0,
               now: float | None = None) -> list[dict]:
    """Everyone's share links, newest first (the admin page): the open ones, or all."""
    return [dict(r) for r in _read(index, _ALL_SHARES, everything=0 if open_only else 1, limit=limit,
                                   offset=offset, now=time.time() if now is None else now)]


# -- audit ---------------------------------------------------------------------------------

AUDIT_COLUMNS = ("seq", "time", "user_name", "action", "study_uid", "outcome", "detail", "address")
_AUDIT_FILTERS = {   # a search field: its condition (only these fragments ever join the statement)
    "who": "user_name = :who", "action": "action = :action", "study": "study_uid = :study",
    "outcome": "outcome = :outcome", "since": "time >= :since", "until": "time < :until", "before": "seq < :before",
}
AUDIT_ACTIONS = (   # what the viewer records (the admin page's search offers these: a DISTINCT would read the table)
    "login", "logout", "view", "view_model", "download", "upload", "share", "share_open", "share_revoke", "job",
    "job_cancel", "dicomweb", "read_refused", "right_refused", "audit_search", "audit_export", "user_add",
    "user_password", "user_role",
    "user_disable", "user_enable", "user_sessions", "token_create", "token_revoke", "deid_export", "deid_lookup",
    "deid_secret")


def audit_search(index: Index, filters: dict, limit: int = 100) -> list[dict]:
    """Audit records, newest first, that meet every filter given (`_AUDIT_FILTERS`: who, action, study,
    outcome exactly; since / until: seconds since the epoch; before: a seq, for the next page)."""
    unknown = set(filters) - set(_AUDIT_FILTERS)
    if unknown:
        raise ValueError(f"no audit filter {sorted(unknown)[0]!r}")
    where = " AND ".join(_AUDIT_FILTERS[name] for name in sorted(filters)) or "1 = 1"
    statement = text(f"SELECT {', '.join(AUDIT_COLUMNS)} FROM audit WHERE {where} ORDER BY seq DESC LIMIT :limit")
    return [dict(r) for r in _read(index, statement, **filters, limit=limit)]


def audit(index: Index, who: str | None, action: str, outcome: str = "ok", *, study_uid: str | None = None,
          detail: str | None = None, address: str | None = None) -> None:
    audit_many(index, who, action, [(outcome, study_uid, detail)], address=address)


def audit_many(index: Index, who: str | None, action: str, records: list[tuple[str, str | None, str | None]], *,
               address: str | None = None) -> None:
    """Several records of one action, (outcome, study UID, detail) each, in one transaction."""
    if not records:
        return
    now = time.time()
    with index.write() as conn:
        conn.execute(_AUDIT, [{"now": now, "who": who, "action": action, "study_uid": study_uid, "outcome": outcome,
                               "detail": (detail or "")[:500] or None, "address": address}
                              for outcome, study_uid, detail in records])


class KeysDiffer(RuntimeError):
    """This node's key-encryption keys are not those of the other nodes on its index."""


SECRET_NAME = "share-links"
_SECRET = text("SELECT key_id, wrapped FROM viewer_secret WHERE name = :name")
_ADD_SECRET = text("INSERT INTO viewer_secret (name, key_id, wrapped, created_at, wrapped_at) "
                   "VALUES (:name, :key_id, :wrapped, :now, :now) ON CONFLICT (name) DO NOTHING")
_REWRAP_SECRET = text("UPDATE viewer_secret SET key_id = :key_id, wrapped = :wrapped, wrapped_at = :now "
                      "WHERE name = :name AND key_id = :old")


def shared_secret(index: Index, keyring: Keyring, data_dir: Path) -> bytes:
    """The share links' signing secret, the same on every node of the index.

    It is kept in the index wrapped like the data key of an object in S3 (`keyring.remote`: KMS when
    set, else the local key-encryption key): the first node to start writes it, adopting its
    `keys/viewer.secret` when it has one (links made before stay valid); every node unwraps it here.
    That is also the check that this node's keys are the others': on a shared index a node that cannot
    unwrap it, or would wrap with another key, is refused (`KeysDiffer`), before it writes anything
    the others cannot read. A single node (SQLite) re-wraps it with its current key instead.
    """
    row = index.read(_SECRET, {"name": SECRET_NAME})
    if not row:
        old = data_dir / "keys" / "viewer.secret"
        adopted = old.is_file() and len(old.read_bytes()) == 32
        secret = old.read_bytes() if adopted else secrets.token_bytes(32)
        key_id, wrapped = keyring.remote.wrap(secret)
        with index.write() as conn:
            conn.execute(_ADD_SECRET, {"name": SECRET_NAME, "key_id": key_id, "wrapped": wrapped, "now": time.time()})
        row = index.read(_SECRET, {"name": SECRET_NAME})      # another node's, when it wrote first
    key_id, wrapped = row[0].key_id, bytes(row[0].wrapped)
    try:
        secret = keyring.unwrap(key_id, wrapped)
    except IntegrityError as exc:
        raise KeysDiffer(f"this node's keys cannot unwrap what the other nodes on its index wrap (the share links' "
                         f"secret, wrapped by {key_id}: {exc}). {_same_keys(data_dir, key_id)}") from None
    current = keyring.remote.current_key_id()
    if current != key_id:
        if not index.sqlite:
            raise KeysDiffer(
                f"this node would wrap data keys with {current}, but the nodes on its index use {key_id}: the "
                f"others could not read what it offloads. {_same_keys(data_dir, key_id)}; a key file only this "
                f"node has must leave {data_dir / 'keys'} (keep it elsewhere if blobs of this node use it)")
        rewrap_secret(index, keyring)
    old = data_dir / "keys" / "viewer.secret"
    if old.is_file():
        if old.read_bytes() == secret:
            log.info("viewer: the share links' secret is in the index: %s is no longer read (delete it)", old)
        else:
            log.warning("viewer: %s is not the share links' secret of this index: links made with it no longer "
                        "open (delete the file)", old)
    return secret


def _same_keys(data_dir: Path, key_id: str) -> str:
    """What the operator of a node whose keys are not the others' does."""
    if key_id.startswith(KMS_PREFIX):
        return (f"The nodes on this index use AWS KMS: set crypto.kms_key_id to {key_id.removeprefix(KMS_PREFIX)} "
                "(and let this node use it: kms:Encrypt, kms:Decrypt, kms:GenerateDataKey, kms:DescribeKey)")
    return ("Nodes on one index share their key-encryption key: stop this node and copy the *.kek files of "
            f"data_dir/keys of a node that runs on this index into {data_dir / 'keys'} (mode 0600); after "
            "`m3dicom keys rotate` on one node, copy its new key file to the others")


def rewrap_secret(index: Index, keyring: Keyring) -> bool:
    """Wrap the shared secret with this node's current key (`m3dicom keys rotate`); False: nothing to do."""
    row = index.read(_SECRET, {"name": SECRET_NAME})
    if not row:
        return False
    old, current = row[0].key_id, keyring.remote.current_key_id()
    if old == current:
        return False
    key_id, wrapped = keyring.remote.wrap(keyring.unwrap(old, bytes(row[0].wrapped)))
    with index.write() as conn:
        changed = conn.execute(_REWRAP_SECRET, {"name": SECRET_NAME, "key_id": key_id, "wrapped": wrapped,
                                                "now": time.time(), "old": old}).rowcount
    return bool(changed)
