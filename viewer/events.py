"""Notifications: the `changes` log's job and result events, fanned out to every listening browser.

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
        return self._events(after, self.last)

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
        events = self._events(self.last)
        if events:
            self.last = events[-1]["seq"]
        else:
            self.last = max(self.last, self._latest())
        return events

    def _events(self, after: int, upto: int | None = None) -> list[dict]:
        rows = self.index.query(
            f"SELECT c.seq, c.kind, c.study_uid, c.job_id, j.plugin, j.state, j.progress, j.progress_message, "
            f"j.summary FROM changes c LEFT JOIN jobs j ON j.id = c.job_id WHERE c.seq > ? AND c.seq <= ? "
            f"AND c.kind IN ({','.join('?' * len(KINDS))}) ORDER BY c.seq LIMIT 500",
            (after, upto if upto is not None else 2 ** 62, *KINDS))
        events = []
        for row in rows:
            event = {k: row[k] for k in ("seq", "kind", "study_uid", "job_id", "plugin", "state", "progress",
                                         "progress_message")}
            event["summary"] = json.loads(row["summary"]) if row["summary"] else None
            events.append(event)
        return events

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
