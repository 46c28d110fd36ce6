"""Notifications: the `changes` log's job and result events, and the studies that received
instances (`study_stored`, for the study list), fanned out to every listening browser.

One task polls the log (by sequence number, twice a second, only while someone listens) and
hands each event to the subscribers' queues; each server-sent-events connection filters what
its session may see (a share link: its study only). A browser that reconnects names the last
event it saw (Last-Event-ID) and is sent what it missed; a new page starts from now, since it
has just read the current state.

Each stream holds a queue and a connection (about 300 KB with what it is sent), so a session
may hold `viewer.max_event_streams` of them and an address (IPv6: its /64)
`viewer.max_event_streams_per_address`, all its sessions together: one more is refused
(`TooManyStreams`), and a stream counts until its connection closes.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

from archive import changes
from archive.db import RoundFailures
from archive.index import Index
from router.queue import jobs_by_id

log = logging.getLogger(__name__)
POLL = 0.5
KINDS = ("job_queued", "job_running", "job_progress", "job_succeeded", "job_failed", "job_cancelled",
         "job_forwarded", "job_forward_failed")
JOB_FIELDS = ("plugin", "state", "progress", "progress_message", "summary")   # an event's, of its job now
JOB_EVENTS = 500          # job events per read of the log
STUDIES_STORED = 500      # studies that received instances, per read of the log
REFUSAL_LOG_EVERY = 60.0  # seconds between two log lines about refused streams of one session or address


class TooManyStreams(Exception):
    """A session, or an address, already holds as many notification streams as it may."""


class Broker:
    def __init__(self, index: Index, per_session: int = 6, per_address: int = 32):
        self.index = index
        self._failed = RoundFailures(log, "reading the change log for notifications")   # one line a minute
        self.per_session, self.per_address = per_session, per_address
        self.subscribers: set[asyncio.Queue] = set()
        self.open: Counter[str] = Counter()               # streams per "session:..." and "address:..."
        self._counted: dict[asyncio.Queue, tuple[str, str]] = {}
        self._logged: dict[str, float] = {}
        self._task: asyncio.Task | None = None
        self.last = changes.latest(index)

    def subscribe(self, session: str, address: str) -> asyncio.Queue:
        """A queue of the events to come, counted against `session` and `address` (TooManyStreams
        when either holds its share already)."""
        keys = (f"session:{session}", f"address:{address}")
        for key, limit, setting, holder in ((keys[0], self.per_session, "max_event_streams", "this session"),
                                            (keys[1], self.per_address, "max_event_streams_per_address",
                                             "your network address")):
            if self.open[key] >= limit:
                self._log_refusal(key, setting, limit)
                raise TooManyStreams(f"{holder} already has {limit} notification streams open "
                                     f"(viewer.{setting}): close other tabs of the viewer, or reload this one "
                                     "in a moment")
        queue: asyncio.Queue = asyncio.Queue(maxsize=1000)
        for key in keys:
            self.open[key] += 1
        self._counted[queue] = keys
        if self._task is None or self._task.done():
            self.last = self._latest()                  # nobody listened: what happened meanwhile is old news
            self._task = asyncio.get_running_loop().create_task(self._poll())
        self.subscribers.add(queue)
        return queue

    def missed(self, after: int) -> list[dict]:
        """The events after sequence number `after` up to what the subscribers are being sent (at most 500)."""
        return self._events(after, self.last)[0]

    def _latest(self) -> int:
        return changes.latest(self.index)

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self.subscribers.discard(queue)
        for key in self._counted.pop(queue, ()):
            self.open[key] -= 1
            if self.open[key] <= 0:
                del self.open[key]

    def _log_refusal(self, key: str, setting: str, limit: int) -> None:
        """One line per session or address a minute, however many streams it is refused."""
        now = time.monotonic()
        if now - self._logged.get(key, -REFUSAL_LOG_EVERY) >= REFUSAL_LOG_EVERY:
            if len(self._logged) > 10000:
                self._logged.clear()
            self._logged[key] = now
            log.warning("notification stream refused: %s already holds %d (viewer.%s)",
                        "a session" if key.startswith("session:") else key, limit, setting)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def _read(self) -> list[dict]:
        events, self.last = self._events(self.last, self._latest())
        return events

    def _events(self, after: int, upto: int) -> tuple[list[dict], int]:
        """The events after `after` up to `upto` (at most JOB_EVENTS job events and STUDIES_STORED studies), and
        the sequence number read up to. A study that received instances is one `study_stored` event
        (the study list shows it), however many instances came."""
        found = changes.read(self.index, after, upto, KINDS, JOB_EVENTS)
        if len(found) == JOB_EVENTS:
            upto = found[-1].seq
        jobs = jobs_by_id(self.index, [c.job_id for c in found if c.job_id])
        events = []
        for change in found:
            job = jobs.get(change.job_id)
            events.append({"seq": change.seq, "kind": change.kind, "study_uid": change.study_uid,
                           "job_id": change.job_id, **{k: getattr(job, k) if job else None for k in JOB_FIELDS}})
        stored = self.index.studies_stored(after, upto, STUDIES_STORED)
        if len(stored) == STUDIES_STORED:
            upto = min(upto, stored[-1][0])
            events = [e for e in events if e["seq"] <= upto]
        events += [{"seq": seq, "kind": "study_stored", "study_uid": uid} for seq, uid in stored]
        return sorted(events, key=lambda e: e["seq"]), upto

    async def _poll(self) -> None:
        loop = asyncio.get_running_loop()
        while self.subscribers:
            try:
                for event in await loop.run_in_executor(None, self._read):
                    for queue in list(self.subscribers):
                        if not queue.full():
                            queue.put_nowait(event)
            except Exception as exc:
                self._failed(exc)
            await asyncio.sleep(POLL)
