"""Notifications: the `changes` log's job and result events, and the studies that received
instances (`study_stored`, for the study list), fanned out to every listening browser.

One task polls the log (by sequence number, twice a second, only while someone listens) and
hands each event to the subscribers' queues; each server-sent-events connection filters what
its session may see (a share link: its study only). A browser that reconnects names the last
event it saw (Last-Event-ID) and is sent what it missed; a new page starts from now, since it
has just read the current state.
"""
from __future__ import annotations

import asyncio
import json
import logging

from archive.index import Index

log = logging.getLogger(__name__)
POLL = 0.5
KINDS = ("job_queued", "job_running", "job_progress", "job_succeeded", "job_failed", "job_cancelled",
         "job_forwarded", "job_forward_failed")
STUDIES_STORED = 500      # studies that received instances, per read of the log


class Broker:
    def __init__(self, index: Index):
        self.index = index
        self.subscribers: set[asyncio.Queue] = set()
        self._task: asyncio.Task | None = None
        rows = index.query("SELECT MAX(seq) FROM changes")
        self.last = rows[0][0] or 0

    def subscribe(self) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue(maxsize=1000)
        if self._task is None or self._task.done():
            self.last = self._latest()                  # nobody listened: what happened meanwhile is old news
            self._task = asyncio.get_running_loop().create_task(self._poll())
        self.subscribers.add(queue)
        return queue

    def missed(self, after: int) -> list[dict]:
        """The events after sequence number `after` up to what the subscribers are being sent (at most 500)."""
        return self._events(after, self.last)[0]

    def _latest(self) -> int:
        return self.index.query("SELECT MAX(seq) FROM changes")[0][0] or 0

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self.subscribers.discard(queue)

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
        """The events after `after` up to `upto` (at most 500 job events and STUDIES_STORED studies), and
        the sequence number read up to. A study that received instances is one `study_stored` event
        (the study list shows it), however many instances came."""
        rows = self.index.query(
            f"SELECT c.seq, c.kind, c.study_uid, c.job_id, j.plugin, j.state, j.progress, j.progress_message, "
            f"j.summary FROM changes c LEFT JOIN jobs j ON j.id = c.job_id WHERE c.seq > ? AND c.seq <= ? "
            f"AND c.kind IN ({','.join('?' * len(KINDS))}) ORDER BY c.seq LIMIT 500",
            (after, upto, *KINDS))
        if len(rows) == 500:
            upto = rows[-1]["seq"]
        events = []
        for row in rows:
            event = {k: row[k] for k in ("seq", "kind", "study_uid", "job_id", "plugin", "state", "progress",
                                         "progress_message")}
            event["summary"] = json.loads(row["summary"]) if row["summary"] else None
            events.append(event)
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
            except Exception:
                log.exception("reading the change log for notifications")
            await asyncio.sleep(POLL)
