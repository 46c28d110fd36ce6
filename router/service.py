"""The router process: finished studies -> rules -> jobs -> Dask -> results -> archive and PACS.

One loop, a few times a second (`Router.step`):
1. take the new `stored` changes: each study's last instance and when it came;
2. a study quiet for a rule's `quiet_seconds` is judged by that rule; matching series make
   jobs (a later instance makes new jobs that supersede the earlier ones);
3. running jobs whose lease expired (their worker or the node died) go back to the queue;
4. finished Dask futures: results taken in (or the attempt failed), forwards queued;
5. queued jobs leased and submitted, as many as the cluster has worker threads;
6. leases renewed, progress from the workers recorded, due forwards sent.
Nothing here blocks a C-STORE: this is a process of its own, reading the index.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import Future as ThreadFuture, ThreadPoolExecutor
from dataclasses import dataclass

from archive import Archive
from archive.index import Index
from gpu_workers.plugin import ParamError, Plugin, PluginError, check_params, discover
from gpu_workers.runner import InputInstance, InputSeries, JobSpec

from . import queue
from .executor import Executor, Refused
from .intake import IntakeError, backoff, discard, forward, take_results
from .jobs import Expire, Fail, IllegalTransition, Lease, Renew, Succeed
from .rules import CompiledRule, SeriesFacts, compile_rules
from .settings import Settings

log = logging.getLogger(__name__)

CURSOR = "router"
ROUTED = ("stored", "replaced")        # changes that can complete a study (results are "result_stored")
LEASE = 60.0                           # seconds a lease lasts; renewed every RENEW seconds while running
RENEW = 15.0
PROGRESS_EVERY = 1.0                   # at most one progress change per job and second


class RouterError(RuntimeError):
    """The router's configuration cannot work (unknown plug-in, bad parameters)."""


def load_plugins(config: Settings) -> dict[str, Plugin]:
    """The plug-ins, with every rule's plug-in and parameters checked (a clear error at start)."""
    try:
        plugins = discover(config.router.plugins)
    except PluginError as exc:
        raise RouterError(str(exc)) from None
    for i, rule in enumerate(config.router.rules):
        if rule.plugin not in plugins:
            raise RouterError(f"router.rules[{i}] ({rule.name}): no plug-in named {rule.plugin!r} "
                              f"(installed: {', '.join(sorted(plugins)) or 'none'})")
        try:
            check_params(plugins[rule.plugin], rule.params)
        except ParamError as exc:
            raise RouterError(f"router.rules[{i}] ({rule.name}).params: {exc}") from None
    return plugins


@dataclass
class _Running:
    future: object                      # a distributed.Future
    attempt: int
    started: float
    renewed: float


class Router:
    def __init__(self, config: Settings, archive: Archive, executor: Executor | None = None, clock=time.time):
        self.config, self.archive, self.clock = config, archive, clock
        self.plugins = load_plugins(config)
        self.rules = compile_rules(config.router.rules)
        self.executor = executor or Executor(config)
        self.running: dict[str, _Running] = {}
        self._forwarding: dict[tuple[str, str], ThreadFuture] = {}
        self._forwarder = ThreadPoolExecutor(1, thread_name_prefix="forward")
        self._progress_sent: dict[str, float] = {}
        self._wake = threading.Event()          # set when a task or a forward finishes
        self._next_due = float("inf")           # when the next quiet period ends
        self.spool = config.data_dir / "spool" / "router"

    @property
    def index(self) -> Index:
        return self.archive.index

    def run(self, stop: threading.Event, idle: float = 0.25) -> None:
        """Step, then sleep until the next quiet period ends, a task finishes, or `idle` passes."""
        while not stop.is_set():
            try:
                self.step()
            except Exception:
                log.exception("router round failed")
            self._wake.wait(max(0.0, min(idle, self._next_due - self.clock())))
            self._wake.clear()

    def close(self) -> None:
        self._forwarder.shutdown(wait=True)
        self.executor.close()

    def step(self) -> None:
        now = self.clock()
        self.take_changes()
        self.make_due_jobs(now)
        self.expire_leases(now)
        self.collect(now)
        self.dispatch(now)
        self.renew(now)
        self.record_progress()
        self.forward_due(now)

    # -- study completion -----------------------------------------------------------------

    def take_changes(self, limit: int = 5000) -> int:
        with self.index.write() as conn:
            row = conn.execute("SELECT seq FROM cursors WHERE name=?", (CURSOR,)).fetchone()
            cursor = row[0] if row else 0
            changes = conn.execute("SELECT seq, kind, study_uid, time FROM changes WHERE seq > ? ORDER BY seq LIMIT ?",
                                   (cursor, limit)).fetchall()
            if not changes:
                return 0
            for change in changes:
                if change["kind"] in ROUTED and change["study_uid"]:
                    conn.execute("INSERT INTO router_studies (study_uid, last_seq, last_time) VALUES (?,?,?) "
                                 "ON CONFLICT(study_uid) DO UPDATE SET last_seq=excluded.last_seq, "
                                 "last_time=excluded.last_time", (change["study_uid"], change["seq"], change["time"]))
            conn.execute("INSERT INTO cursors (name, seq) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET seq=excluded.seq",
                         (CURSOR, changes[-1]["seq"]))
        return len(changes)

    def make_due_jobs(self, now: float) -> list[str]:
        made = []
        self._next_due = float("inf")
        for study in self.index.query("SELECT study_uid, last_seq, last_time FROM router_studies"):
            waiting = False
            for rule in self.rules:
                fired = self.index.query("SELECT seq FROM router_fired WHERE study_uid=? AND rule=?",
                                         (study["study_uid"], rule.name))
                fired_seq = fired[0]["seq"] if fired else 0
                if fired_seq >= study["last_seq"]:
                    continue
                due = study["last_time"] + rule.rule.quiet_seconds
                if now < due:
                    waiting = True
                    self._next_due = min(self._next_due, due)
                    continue
                made += self._judge(rule, study["study_uid"], fired_seq, study["last_seq"], now)
            if not waiting:
                with self.index.write() as conn:
                    conn.execute("DELETE FROM router_studies WHERE study_uid=? AND last_seq=?",
                                 (study["study_uid"], study["last_seq"]))
        return made

    def study_facts(self, study_uid: str) -> list[SeriesFacts]:
        rows = self.index.query(
            "SELECT se.series_uid, se.modality, se.body_part, se.series_description, s.study_description, "
            "json_group_array(DISTINCT i.sop_class_uid) AS classes, json_group_array(DISTINCT i.calling_ae) AS aes "
            "FROM studies s JOIN series se ON se.study_pk = s.pk JOIN instances i ON i.series_pk = se.pk "
            "WHERE s.study_uid = ? AND i.job_id IS NULL GROUP BY se.pk ORDER BY se.pk", (study_uid,))
        return [SeriesFacts(r["series_uid"], r["modality"], r["body_part"], r["series_description"],
                            r["study_description"], frozenset(json.loads(r["classes"])),
                            frozenset(a for a in json.loads(r["aes"]) if a)) for r in rows]

    def _judge(self, rule: CompiledRule, study_uid: str, after: int, upto: int, now: float) -> list[str]:
        """Jobs for the series of a quiet study that `rule` matches and that changed since it last judged."""
        plugin = self.plugins[rule.rule.plugin]
        series = [s for s in rule.select(self.study_facts(study_uid))
                  if plugin.accepts.takes(s.modality, sorted(s.sop_classes))]
        changed = {r[0] for r in self.index.query(
            "SELECT DISTINCT series_uid FROM changes WHERE study_uid=? AND seq > ? AND seq <= ? AND kind IN (?, ?)",
            (study_uid, after, upto, *ROUTED))}
        if plugin.accepts.per == "study":
            groups = [series] if series and changed & {s.series_uid for s in series} else []
        else:
            groups = [[s] for s in series if s.series_uid in changed]
        made = []
        with self.index.write() as conn:
            for group in groups:
                inputs = [s.series_uid for s in group]
                earlier = self._latest(conn, rule.name, study_uid, inputs if plugin.accepts.per == "series" else None)
                if earlier is not None and earlier["state"] == "queued":
                    conn.execute("UPDATE jobs SET state='cancelled', finished_at=? WHERE id=?", (now, earlier["id"]))
                    Index.add_job_change(conn, "job_cancelled", earlier["id"], study_uid)
                made.append(queue.create(self.index, study_uid=study_uid, plugin=plugin.name, params=rule.rule.params,
                                         inputs=inputs, rule=rule.name, created_by=f"rule:{rule.name}",
                                         forward_to=rule.rule.forward_to, max_attempts=self.config.router.max_attempts,
                                         supersedes=earlier["id"] if earlier is not None else None, now=now, conn=conn))
            conn.execute("INSERT INTO router_fired (study_uid, rule, seq) VALUES (?,?,?) "
                         "ON CONFLICT(study_uid, rule) DO UPDATE SET seq=excluded.seq", (study_uid, rule.name, upto))
        for job_id in made:
            log.info("rule %s: job %s (%s) for study %s", rule.name, job_id, plugin.name, study_uid)
        return made

    @staticmethod
    def _latest(conn, rule: str, study_uid: str, inputs: list[str] | None):
        for row in conn.execute("SELECT id, state, inputs FROM jobs WHERE rule=? AND study_uid=? "
                                "ORDER BY created_at DESC", (rule, study_uid)):
            if inputs is None or json.loads(row["inputs"]) == inputs:
                return row
        return None

    # -- running jobs ---------------------------------------------------------------------

    def expire_leases(self, now: float) -> None:
        for row in self.index.query("SELECT id FROM jobs WHERE state='running' AND lease_expires < ?", (now,)):
            running = self.running.pop(row["id"], None)
            if running is not None:
                running.future.cancel()
            try:
                job = queue.apply(self.index, row["id"], Expire(now))
                log.warning("job %s: lease expired, now %s", row["id"], job.state)
            except IllegalTransition:
                pass

    def dispatch(self, now: float) -> None:
        queued = self.index.query("SELECT id FROM jobs WHERE state='queued' ORDER BY created_at LIMIT 100")
        if not queued:
            return
        free = self.executor.capacity() - len(self.running)
        for row in queued[:max(0, free)]:
            job = queue.apply(self.index, row["id"], Lease("dask", now, LEASE))
            try:
                spec = self._spec(job)
            except PluginError as exc:
                queue.apply(self.index, job.id, Fail(now, str(exc), final=True))
                continue
            future = self.executor.submit(spec, job.attempts, self.plugins[job.plugin].wants_gpu)
            future.add_done_callback(lambda _: self._wake.set())
            self.running[job.id] = _Running(future, job.attempts, now, now)
            log.info("job %s (%s) started, attempt %d of %d", job.id, job.plugin, job.attempts, job.max_attempts)

    def _spec(self, job: queue.JobRecord) -> JobSpec:
        if job.plugin not in self.plugins:
            raise PluginError(f"no plug-in named {job.plugin!r}")
        series = []
        for series_uid in job.inputs:
            rows = self.index.query(
                "SELECT se.modality, i.sop_instance_uid, i.sop_class_uid, i.blob_id, i.sha256 FROM series se "
                "JOIN instances i ON i.series_pk = se.pk WHERE se.series_uid=? AND i.job_id IS NULL "
                "ORDER BY i.instance_number, i.pk", (series_uid,))
            if not rows:
                raise PluginError(f"series {series_uid} has no instances in the archive")
            series.append(InputSeries(series_uid, rows[0]["modality"], tuple(
                InputInstance(r["sop_instance_uid"], r["sop_class_uid"], r["blob_id"], r["sha256"]) for r in rows)))
        predecessors = ()
        if job.supersedes:
            predecessors = tuple({k: r[k] for k in ("sop_class_uid", "sop_instance_uid", "series_uid", "study_uid")}
                                 for r in queue.results(self.index, job.supersedes)
                                 if r["kind"] == "dicom" and r["sop_class_uid"] and r["sop_class_uid"].startswith(
                                     "1.2.840.10008.5.1.4.1.1.88."))
        return JobSpec(job.id, job.plugin, job.params, tuple(series), self.config, predecessors)

    def renew(self, now: float) -> None:
        for job_id, running in list(self.running.items()):
            if now - running.renewed >= RENEW:
                try:
                    queue.apply(self.index, job_id, Renew(now, LEASE))
                    running.renewed = now
                except IllegalTransition:   # cancelled or expired meanwhile: collect() lets it go
                    pass

    def collect(self, now: float) -> None:
        if not self.running:
            return
        states = {r["id"]: r["state"] for r in self.index.query(
            f"SELECT id, state FROM jobs WHERE id IN ({','.join('?' * len(self.running))})", tuple(self.running))}
        timeout = self.config.router.job_timeout
        for job_id, running in list(self.running.items()):
            future = running.future
            if states.get(job_id) != "running":          # cancelled through the API, or expired
                self._drop(future)
                del self.running[job_id]
                continue
            if not future.done():
                if now - running.started > timeout:
                    future.cancel()
                    del self.running[job_id]
                    queue.apply(self.index, job_id, Fail(now, f"timed out after {timeout:.0f} s (router.job_timeout)"))
                continue
            del self.running[job_id]
            self._finish(job_id, future, now)

    def _finish(self, job_id: str, future, now: float) -> None:
        job = queue.get(self.index, job_id)
        if future.status == "finished":
            output = future.result()
            if isinstance(output, Refused):            # the plug-in refused its input: final, one line
                job = queue.apply(self.index, job_id, Fail(now, str(output)[:2000], final=True))
                log.warning("job %s attempt %d failed (%s): %s", job_id, job.attempts, job.state, str(output)[:300])
                return
            try:
                count = take_results(self.archive, job_id, job.study_uid, output.outputs, self.spool)
            except (IntakeError, OSError) as exc:
                discard(self.archive, output.outputs)
                queue.apply(self.index, job_id, Fail(self.clock(), f"results not stored: {exc}"))
                return
            timings = {"worker_started": output.started_at, "plugin_returned": output.returned_at,
                       "stored": self.clock(), "seconds": output.seconds, "backend": output.backend}
            queue.apply(self.index, job_id, Succeed(self.clock()), summary=output.summary, progress=1.0,
                        timings=timings)
            log.info("job %s succeeded: %d results in %.1f s (%s)", job_id, count, output.seconds, output.backend)
            if job.forward_to:
                with self.index.write() as conn:
                    conn.executemany("INSERT OR IGNORE INTO forwards (job_id, destination, state, next_try) "
                                     "VALUES (?,?,'pending',?)", [(job_id, d, now) for d in job.forward_to])
            return
        exc = future.exception() if future.status == "error" else None
        final = isinstance(exc, (PluginError, ParamError))
        error = f"{type(exc).__name__}: {exc}" if exc is not None else f"the task was {future.status}"
        job = queue.apply(self.index, job_id, Fail(now, error[:2000], final=final))
        log.warning("job %s attempt %d failed (%s): %s", job_id, job.attempts, job.state, error[:300])

    def _drop(self, future) -> None:
        """Let a task go; what it staged already is removed (later, `Archive.recover` takes the rest)."""
        if future.done() and future.status == "finished" and not isinstance(future.result(), Refused):
            discard(self.archive, future.result().outputs)
        future.cancel()

    def record_progress(self) -> None:
        latest: dict[str, dict] = {}
        while not self.executor.progress.empty():
            event = self.executor.progress.get()
            latest[event.get("job", "")] = event
        now = time.monotonic()
        for job_id, event in latest.items():
            if job_id in self.running and now - self._progress_sent.get(job_id, 0) >= PROGRESS_EVERY:
                queue.set_progress(self.index, job_id, event.get("fraction", 0.0), event.get("message", ""))
                self._progress_sent[job_id] = now

    # -- forwarding -----------------------------------------------------------------------

    def forward_due(self, now: float) -> None:
        for key, future in list(self._forwarding.items()):
            if not future.done():
                continue
            del self._forwarding[key]
            job_id, destination = key
            error = future.result()
            with self.index.write() as conn:
                study = conn.execute("SELECT study_uid FROM jobs WHERE id=?", (job_id,)).fetchone()[0]
                if not error:
                    conn.execute("UPDATE forwards SET state='sent', attempts=attempts+1, last_error=NULL "
                                 "WHERE job_id=? AND destination=?", key)
                    Index.add_job_change(conn, "job_forwarded", job_id, study)
                    log.info("job %s: results forwarded to %s", job_id, destination)
                else:
                    attempts = conn.execute("SELECT attempts FROM forwards WHERE job_id=? AND destination=?",
                                            key).fetchone()[0]
                    delay = backoff(attempts, self.config.router.forward_retry_max_delay)
                    conn.execute("UPDATE forwards SET attempts=attempts+1, next_try=?, last_error=? "
                                 "WHERE job_id=? AND destination=?", (now + delay, error[:2000], *key))
                    Index.add_job_change(conn, "job_forward_failed", job_id, study)
                    log.warning("job %s: forwarding to %s failed (retry in %.0f s): %s", job_id, destination, delay,
                                error)
        if self._forwarding:
            return
        for row in self.index.query("SELECT job_id, destination FROM forwards WHERE state='pending' AND next_try <= ? "
                                    "ORDER BY next_try LIMIT 1", (now,)):
            key = (row["job_id"], row["destination"])
            self._forwarding[key] = self._forwarder.submit(forward, self.archive, self.config, *key)
            self._forwarding[key].add_done_callback(lambda _: self._wake.set())

