"""The de-identification tables (router_0002): exports and the sealed way back. The only SQL on them.

An export is leased like a job: a router (or the CLI running one by hand) takes a queued one, or a
running one whose lease expired (its node died), and finishes it as succeeded, or as failed, queued
again after a backoff until `max_attempts`. The originals behind a pseudonym are sealed with a data key
wrapped by the node's key encryption key (`archive.crypto`), as every blob is.
"""
from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import text
from sqlalchemy.engine import Connection

from archive.index import Index

_COLUMNS = ("id, study_uid, profile, destination, state, rule, created_by, attempts, max_attempts, next_try, worker, "
            "lease_expires, total, sent, dropped, pseudonym, error, created_at, started_at, finished_at")
_CREATE = text("INSERT INTO deid_exports (id, study_uid, profile, destination, state, rule, created_by, attempts, "
               "max_attempts, next_try, created_at) VALUES (:id, :study_uid, :profile, :destination, 'queued', :rule, "
               ":created_by, 0, :max_attempts, :now, :now)")
_CREATE_RUNNING = text("INSERT INTO deid_exports (id, study_uid, profile, destination, state, rule, created_by, "
                       "attempts, max_attempts, next_try, worker, lease_expires, created_at, started_at) VALUES (:id, "
                       ":study_uid, :profile, :destination, 'running', NULL, :created_by, 1, 1, :now, :worker, "
                       ":until, :now, :now)")
_QUEUED_LIKE = text("SELECT id FROM deid_exports WHERE study_uid = :study_uid AND profile = :profile "
                    "AND destination = :destination AND state = 'queued'")
_COUNTS = text("SELECT state, COUNT(*) FROM deid_exports GROUP BY state")
_GET = text(f"SELECT {_COLUMNS} FROM deid_exports WHERE id = :id")
_LIST = text(f"SELECT {_COLUMNS} FROM deid_exports ORDER BY created_at DESC LIMIT :limit")
_OF_STUDY = text(f"SELECT {_COLUMNS} FROM deid_exports WHERE study_uid = :study_uid ORDER BY created_at DESC "
                 "LIMIT :limit")
_DUE = text("SELECT id FROM deid_exports WHERE (state = 'queued' AND next_try <= :now) "
            "OR (state = 'running' AND lease_expires < :now) ORDER BY next_try LIMIT :limit")
_CLAIM = text("UPDATE deid_exports SET state = 'running', worker = :worker, lease_expires = :until, "
              "attempts = attempts + 1, started_at = :now, error = NULL, total = NULL, sent = NULL, dropped = NULL "
              "WHERE id = :id AND ((state = 'queued' AND next_try <= :now) "
              "OR (state = 'running' AND lease_expires < :now))")
# a running export whose router stopped (its lease ended) on its last attempt: failed, not taken over again (an
# export that kills the router that runs it, a hostile instance, would otherwise be taken up after every restart)
_ABANDON = text("UPDATE deid_exports SET state = 'failed', lease_expires = NULL, finished_at = :now, "
                "error = :error WHERE id = :id AND state = 'running' AND lease_expires < :now "
                "AND attempts >= max_attempts")
_DEFER = text("UPDATE deid_exports SET next_try = :next_try WHERE id = :id AND state = 'queued'")
_RENEW = text("UPDATE deid_exports SET lease_expires = :until "
              "WHERE id = :id AND state = 'running' AND worker = :worker")
_PROGRESS = text("UPDATE deid_exports SET total = :total, sent = :sent, dropped = :dropped, pseudonym = :pseudonym "
                 "WHERE id = :id AND worker = :worker")
_SUCCEED = text("UPDATE deid_exports SET state = 'succeeded', lease_expires = NULL, finished_at = :now, "
                "error = NULL WHERE id = :id AND state = 'running' AND worker = :worker")
_FAIL = text("UPDATE deid_exports SET state = CASE WHEN attempts >= max_attempts OR :final THEN 'failed' "
             "ELSE 'queued' END, next_try = :next_try, lease_expires = NULL, error = :error, finished_at = CASE WHEN "
             "attempts >= max_attempts OR :final THEN :now ELSE NULL END "
             "WHERE id = :id AND state = 'running' AND worker = :worker")
_PATIENT = text("SELECT key_mac FROM deid_patients WHERE project = :project AND pseudonym = :pseudonym")
_ADD_PATIENT = text("INSERT INTO deid_patients (project, pseudonym, key_mac, key_id, wrapped, sealed, created_at) "
                    "VALUES (:project, :pseudonym, :key_mac, :key_id, :wrapped, :sealed, :now) ON CONFLICT DO NOTHING")
_ADD_STUDY = text("INSERT INTO deid_studies (project, study_uid, pseudonym, key_id, wrapped, sealed, created_at) "
                  "VALUES (:project, :study_uid, :pseudonym, :key_id, :wrapped, :sealed, :now) ON CONFLICT DO NOTHING")
_LOOKUP_PATIENT = text("SELECT project, pseudonym, key_id, wrapped, sealed FROM deid_patients "
                       "WHERE pseudonym = :pseudonym")
_LOOKUP_STUDIES = text("SELECT project, study_uid, pseudonym, key_id, wrapped, sealed FROM deid_studies "
                       "WHERE pseudonym = :pseudonym OR study_uid = :pseudonym ORDER BY created_at")


class PseudonymClash(RuntimeError):
    """Two original patients give the project one pseudonym (80 bits of HMAC: in practice never)."""


@dataclass(frozen=True)
class Export:
    id: str
    study_uid: str
    profile: str
    destination: str
    state: str
    rule: str | None
    created_by: str | None
    attempts: int
    max_attempts: int
    next_try: float
    worker: str | None
    lease_expires: float | None
    total: int | None
    sent: int | None
    dropped: int | None
    pseudonym: str | None
    error: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None

    def as_json(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("worker", "lease_expires")}


def create(index: Index, *, study_uid: str, profile: str, destination: str, max_attempts: int,
           rule: str | None = None, created_by: str | None = None, now: float | None = None,
           conn: Connection | None = None) -> str:
    """A queued export; an identical one still queued is reused (a study judged again before it ran)."""
    now = time.time() if now is None else now
    values = {"study_uid": study_uid, "profile": profile, "destination": destination}

    def insert(c: Connection) -> str:
        waiting = c.execute(_QUEUED_LIKE, values).first()
        if waiting is not None:
            return waiting[0]
        export_id = secrets.token_hex(8)
        c.execute(_CREATE, {**values, "id": export_id, "rule": rule, "created_by": created_by,
                            "max_attempts": max_attempts, "now": now})
        return export_id

    if conn is not None:
        return insert(conn)
    with index.write() as c:
        return insert(c)


def create_running(index: Index, *, study_uid: str, profile: str, destination: str, created_by: str, worker: str,
                   lease: float, now: float | None = None) -> str:
    """An export made and taken at once (one attempt: `m3dicom deid` by hand), so no router takes it first."""
    now = time.time() if now is None else now
    export_id = secrets.token_hex(8)
    with index.write() as c:
        c.execute(_CREATE_RUNNING, {"id": export_id, "study_uid": study_uid, "profile": profile, "now": now,
                                    "destination": destination, "created_by": created_by, "worker": worker,
                                    "until": now + lease})
    return export_id


def get(index: Index, export_id: str) -> Export | None:
    rows = index.read(_GET, {"id": export_id})
    return Export(*rows[0]) if rows else None


def exports(index: Index, study_uid: str | None = None, limit: int = 100) -> list[Export]:
    if study_uid is None:
        return [Export(*r) for r in index.read(_LIST, {"limit": limit})]
    return [Export(*r) for r in index.read(_OF_STUDY, {"study_uid": study_uid, "limit": limit})]


def counts_by_state(index: Index) -> dict[str, int]:
    return {r[0]: r[1] for r in index.read(_COUNTS)}


def due(index: Index, now: float, limit: int = 1) -> list[str]:
    return [r[0] for r in index.read(_DUE, {"now": now, "limit": limit})]


def claim(index: Index, export_id: str, worker: str, now: float, lease: float) -> bool:
    """Take the export (queued and due, or running with its lease ended); False when it is not to be taken, or
    when its lease ended on its last attempt: then it is failed."""
    with index.write() as c:
        if c.execute(_ABANDON, {"id": export_id, "now": now, "error": "the router running it stopped before it "
                                "ended, on its last attempt: not tried again"}).rowcount:
            return False
        return c.execute(_CLAIM, {"id": export_id, "worker": worker, "until": now + lease, "now": now}).rowcount == 1


def defer(index: Index, export_id: str, next_try: float) -> None:
    with index.write() as c:
        c.execute(_DEFER, {"id": export_id, "next_try": next_try})


def renew(index: Index, export_id: str, worker: str, until: float) -> bool:
    with index.write() as c:
        return c.execute(_RENEW, {"id": export_id, "worker": worker, "until": until}).rowcount == 1


def progress(index: Index, export_id: str, worker: str, *, total: int, sent: int, dropped: int,
             pseudonym: str | None) -> None:
    with index.write() as c:
        c.execute(_PROGRESS, {"id": export_id, "worker": worker, "total": total, "sent": sent, "dropped": dropped,
                              "pseudonym": pseudonym})


def succeed(index: Index, export_id: str, worker: str, now: float) -> bool:
    with index.write() as c:
        return c.execute(_SUCCEED, {"id": export_id, "worker": worker, "now": now}).rowcount == 1


def fail(index: Index, export_id: str, worker: str, error: str, now: float, next_try: float,
         final: bool = False) -> bool:
    with index.write() as c:
        return c.execute(_FAIL, {"id": export_id, "worker": worker, "error": error[:2000], "now": now,
                                 "next_try": next_try, "final": final}).rowcount == 1


# -- the way back ---------------------------------------------------------------------------

def _seal(keyring, aad: str, value: dict) -> dict:
    key, key_id, wrapped = keyring.new_data_key()
    nonce = os.urandom(12)
    sealed = nonce + AESGCM(key).encrypt(nonce, json.dumps(value, sort_keys=True).encode(), aad.encode())
    return {"key_id": key_id, "wrapped": wrapped, "sealed": sealed}


def _open(keyring, aad: str, key_id: str, wrapped: bytes, sealed: bytes) -> dict:
    key = keyring.unwrap(key_id, bytes(wrapped))
    sealed = bytes(sealed)
    return json.loads(AESGCM(key).decrypt(sealed[:12], sealed[12:], aad.encode()))


def remember(index: Index, keyring, *, project: str, pseudonym: str, key_mac: str, patient: dict,
             study_uid: str, study: dict, now: float | None = None) -> None:
    """Keep (sealed) who `pseudonym` is and which study `study_uid` copies; refuses a pseudonym clash."""
    now = time.time() if now is None else now
    with index.write() as c:
        if c.execute(_PATIENT, {"project": project, "pseudonym": pseudonym}).first() is None:
            c.execute(_ADD_PATIENT, {"project": project, "pseudonym": pseudonym, "key_mac": key_mac, "now": now,
                                     **_seal(keyring, f"deid:{project}:{pseudonym}", patient)})
        found = c.execute(_PATIENT, {"project": project, "pseudonym": pseudonym}).first()   # also another's, if
        if found[0] != key_mac:                                                          # it won a race
            raise PseudonymClash(f"pseudonym {pseudonym} of project {project} already names another patient")
        c.execute(_ADD_STUDY, {"project": project, "study_uid": study_uid, "pseudonym": pseudonym, "now": now,
                               **_seal(keyring, f"deid:{project}:{study_uid}", study)})


def rewrap(index: Index, keyring) -> int:
    """Every sealed original's data key wrapped with the current key-encryption key (`m3dicom keys rotate`);
    how many were re-wrapped."""
    current, changed = keyring.current_key_id(), 0
    for table in ("deid_patients", "deid_studies"):
        key = "pseudonym" if table == "deid_patients" else "study_uid"
        rows = index.read(text(f"SELECT project, {key}, key_id, wrapped FROM {table} WHERE key_id <> :current"),
                          {"current": current})
        for project, name, key_id, wrapped in rows:
            new_id, new_wrapped = keyring.wrap(keyring.unwrap(key_id, bytes(wrapped)))
            with index.write() as c:
                changed += c.execute(text(f"UPDATE {table} SET key_id = :new_id, wrapped = :wrapped WHERE project = "
                                          f":project AND {key} = :name AND key_id = :old"),
                                     {"new_id": new_id, "wrapped": new_wrapped, "project": project, "name": name,
                                      "old": key_id}).rowcount
    return changed


def lookup(index: Index, keyring, pseudonym: str) -> list[dict]:
    """Who a pseudonym (or a copy's Study Instance UID) is, per project: the patient and the studies copied."""
    found: dict[str, dict] = {}
    with index.reader() as c:
        patients = c.execute(_LOOKUP_PATIENT, {"pseudonym": pseudonym}).fetchall()
        studies = c.execute(_LOOKUP_STUDIES, {"pseudonym": pseudonym}).fetchall()
        if not patients and studies:            # a copy's study UID was given: its patient too
            patients = c.execute(_LOOKUP_PATIENT, {"pseudonym": studies[0].pseudonym}).fetchall()
    for r in patients:
        found[r.project] = {"project": r.project, "pseudonym": r.pseudonym,
                            "patient": _open(keyring, f"deid:{r.project}:{r.pseudonym}", r.key_id, r.wrapped, r.sealed),
                            "studies": []}
    for r in studies:
        entry = found.setdefault(r.project, {"project": r.project, "pseudonym": r.pseudonym, "patient": None,
                                             "studies": []})
        entry["studies"].append({"copy": r.study_uid, **_open(keyring, f"deid:{r.project}:{r.study_uid}", r.key_id,
                                                              r.wrapped, r.sealed)})
    return list(found.values())
