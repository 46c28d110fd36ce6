"""Notifications: the `changes` log's job and result events, fanned out to every listening browser.

One task polls the log (by sequence number, twice a second, only while someone listens) and
hands each event to the subscribers' queues; each server-sent-events connection filters what
its session may see (a share link: its study only).
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
        self.subscribers.add(queue)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._poll())
        return queue

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
        rows = self.index.query(
            f"SELECT c.seq, c.kind, c.study_uid, c.job_id, j.plugin, j.state, j.progress, j.progress_message, "
            f"j.summary FROM changes c LEFT JOIN jobs j ON j.id = c.job_id WHERE c.seq > ? AND c.kind IN "
            f"({','.join('?' * len(KINDS))}) ORDER BY c.seq LIMIT 500", (self.last, *KINDS))
        events = []
        for row in rows:
            event = {k: row[k] for k in ("seq", "kind", "study_uid", "job_id", "plugin", "state", "progress",
                                         "progress_message")}
            event["summary"] = json.loads(row["summary"]) if row["summary"] else None
            events.append(event)
        if rows:
            self.last = rows[-1]["seq"]
        else:
            latest = self.index.query("SELECT MAX(seq) FROM changes")[0][0]
            self.last = max(self.last, latest or 0)
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
