"""The router process: finished studies -> rules -> jobs -> Dask -> results -> archive and PACS.

One loop, a few times a second (`Router.step`):
1. take the new `stored` changes: each study's last instance and when it came;
2. a study quiet for a rule's `quiet_seconds` is judged by that rule; matching series make
   jobs (a later instance makes new jobs that supersede the earlier ones);
3. running jobs whose lease expired (their router or its node died) go back to the queue;
4. finished Dask futures: results taken in (or the attempt failed), forwards queued;
5. queued jobs leased and submitted, as many as the cluster has worker threads;
6. leases renewed, progress from the workers recorded, due forwards sent.
Nothing here blocks a C-STORE: this is a process of its own, reading the index.

Several nodes' routers may share one index (PostgreSQL): they follow one change log (its cursor is
taken by one router at a time), judge study completion on the shared index (a study's rule is judged
by one router: `store.mark_fired` fails for the other), and lease jobs from one queue. A lease names its
holder, `<node name>/<pid>` (`holder`): a router renews, finishes or fails only what it holds, takes
over another holder's job only once its lease has expired, and at start takes back at once the jobs
of a dead earlier process of its own node name.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future as ThreadFuture, ThreadPoolExecutor
from dataclasses import dataclass

from archive import Archive, metrics, nodes
from archive.changes import consume
from archive.db import RoundFailures
from archive.index import Index
from archive.inputs import input_series, series_changed, study_series
from gpu_workers.plugin import ParamError, Plugin, PluginError, check_params, discover

from . import queue, store
from .deid import store as deid_store
from .executor import Executor, Refused
from .intake import IntakeError, backoff, discard, forward, take_results
from .jobs import Cancel, Expire, Fail, IllegalTransition, Renew, Succeed
from .rules import CompiledRule, SeriesFacts, compile_rules
from .settings import Settings
from .task import JobSpec

log = logging.getLogger(__name__)

CURSOR = "router"
ROUTED = ("stored", "replaced")        # changes that can complete a study (results are "result_stored")
RENEWALS = 4                           # a lease is renewed this many times per router.lease_seconds
PROGRESS_EVERY = 1.0                   # at most one progress change per job and second
EXPORT_WAIT = 5.0                      # seconds before an export whose study is still being analysed looks again
RESTING = 1.0                          # seconds between rounds while nothing runs (Router.resting)
INPUTS_RECHECK = 5.0                   # seconds before a job whose inputs another node holds is looked at again


class RouterError(RuntimeError):
    """The router's configuration cannot work (unknown plug-in, bad parameters)."""


def load_plugins(config: Settings) -> dict[str, Plugin]:
    """The plug-ins, with every rule's plug-in and parameters checked (a clear error at start)."""
    try:
        plugins = discover(config.router.plugins)
    except PluginError as exc:
        raise RouterError(str(exc)) from None
    for i, rule in enumerate(config.router.rules):
        if rule.deid:
            _check_deid(config, i, rule)
            continue
        if rule.plugin not in plugins:
            raise RouterError(f"router.rules[{i}] ({rule.name}): no plug-in named {rule.plugin!r} "
                              f"(installed: {', '.join(sorted(plugins)) or 'none'})")
        try:
            check_params(plugins[rule.plugin], rule.params)
        except ParamError as exc:
            raise RouterError(f"router.rules[{i}] ({rule.name}).params: {exc}") from None
    return plugins


def _check_deid(config: Settings, i: int, rule) -> None:
    """A rule that makes de-identified copies: its profile has a secret (a clear error at start, not a failed
    export per study)."""
    from .deid.export import ExportError, read_secret

    try:
        read_secret(config, rule.deid)
    except ExportError as exc:
        raise RouterError(f"router.rules[{i}] ({rule.name}): {exc}") from None


def holder(config: Settings) -> str:
    """This router's name on its leases: `<node name>/<pid>` (`[node] name`: the host name unless set)."""
    return f"{config.node.name}/{os.getpid()}"


def _gone(held_by: str | None, me: str) -> bool:
    """Whether the lease holder `held_by` is a dead earlier router of this router's node: the same node
    name, and this process or one that no longer runs here (a live one, a second router of the same
    name, keeps its leases until they expire)."""
    node, _, pid = (held_by or "").rpartition("/")
    if node != me.rpartition("/")[0] or not pid.isdigit():
        return False
    if held_by == me:
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False


@dataclass
class _Running:
    future: object                      # a distributed.Future
    attempt: int
    started: float
    renewed: float


class IndexClock:
    """The index's clock, as this machine's clock plus an offset read from the index every `every` seconds: leases
    that several nodes' routers compare are timed by one clock (PostgreSQL's), so a node whose clock is off
    neither takes over live jobs nor holds dead ones longer."""

    def __init__(self, index: Index, every: float = 10.0):
        self.index, self.every = index, every
        self._offset, self._read_at = 0.0, float("-inf")

    def __call__(self) -> float:
        if time.monotonic() - self._read_at >= self.every:
            try:
                before = time.time()
                self._offset = self.index.now() - (before + time.time()) / 2
                self._read_at = time.monotonic()
            except Exception:               # the index away: the last offset, until it answers again
                pass
        return time.time() + self._offset


class Router:
    def __init__(self, config: Settings, archive: Archive, executor: Executor | None = None, clock=None,
                 name: str | None = None):
        """`clock`: seconds since the epoch for leases and quiet periods (the index's, `IndexClock`, when
        None)."""
        self.config, self.archive = config, archive
        self.clock = clock or (time.time if archive.index.sqlite else IndexClock(archive.index))
        self.name = name or holder(config)          # on this router's leases
        self.lease = config.router.lease_seconds
        self._took_back = False
        self._failed = RoundFailures(log, "router round")
        self.plugins = load_plugins(config)
        self.rules = compile_rules(config.router.rules)
        self.executor = executor or Executor(config)
        self.running: dict[str, _Running] = {}
        self._forwarding: dict[tuple[str, str], ThreadFuture] = {}
        self._forwarder = ThreadPoolExecutor(1, thread_name_prefix="forward")
        self._exporting: dict[str, ThreadFuture] = {}
        self._exporter = ThreadPoolExecutor(1, thread_name_prefix="deid")
        self._progress_sent: dict[str, float] = {}
        self._waiting: dict[str, float] = {}     # job -> when to look again: inputs on another node, not in S3
        self._told: set[str] = set()              # jobs whose wait was logged
        self._wake = threading.Event()          # set when a task or a forward finishes
        self._next_due = float("inf")           # when the next quiet period ends
        self.spool = config.data_dir / "spool" / "router"

    @property
    def index(self) -> Index:
        return self.archive.index

    def run(self, stop: threading.Event, idle: float = 0.25) -> None:
        """Step, then sleep until the next quiet period ends, a task finishes, or `idle` passes; `self.resting`
        while nothing of this router runs."""
        resting = self.resting(idle)
        while not stop.is_set():
            try:
                self.step()
            except Exception as exc:
                self._failed(exc)
            pause = idle if self.running or self._forwarding or self._exporting else resting
            self._wake.wait(max(0.0, min(pause, self._next_due - self.clock())))
            self._wake.clear()

    def resting(self, idle: float) -> float:
        """Seconds between rounds while nothing runs: RESTING, or half the shortest quiet period when shorter (a
        study is noticed before its quiet period ends, and judged when it ends), never under `idle`. Each round
        reads the index ~9 times: at `idle` (0.25 s) an idle node's router took 3.5% of a core, and ~2 ms of the
        node's CPU per one-instance association while studies came in."""
        quiet = min((rule.rule.quiet_seconds for rule in self.rules), default=2 * RESTING)
        return max(idle, min(RESTING, quiet / 2))

    def close(self) -> None:
        self._forwarder.shutdown(wait=True)
        self._exporter.shutdown(wait=True)
        self.executor.close()

    def step(self) -> None:
        now = self.clock()
        if not self._took_back:
            self.take_back(now)
        self.take_changes()
        self.make_due_jobs(now)
        self.expire_leases(now)
        self.collect(now)
        self.dispatch(now)
        self.renew(now)
        self.record_progress()
        self.forward_due(now)
        self.export_due(now)

    # -- study completion -----------------------------------------------------------------

    def take_changes(self, limit: int = 5000) -> int:
        """Note the studies that received instances since the last round; how many such changes."""
        with consume(self.index, CURSOR, kinds=ROUTED, limit=limit) as batch:
            for change in batch:
                if change.study_uid:
                    store.note_stored(batch.conn, change.study_uid, change.seq, change.time)
        return len(batch)

    def make_due_jobs(self, now: float) -> list[str]:
        made = []
        self._next_due = float("inf")
        for study in store.pending_studies(self.index):
            waiting = False
            for rule in self.rules:
                fired_seq = store.fired_seq(self.index, study.study_uid, rule.name)
                if fired_seq >= study.last_seq:
                    continue
                due = study.last_time + rule.rule.quiet_seconds
                if now < due:
                    waiting = True
                    self._next_due = min(self._next_due, due)
                    continue
                made += self._judge(rule, study.study_uid, fired_seq, study.last_seq, now)
            if not waiting:
                store.forget_study(self.index, study)
        return made

    def take_back(self, now: float) -> list[str]:
        """At start: the running jobs a dead earlier process of this node held go back to the queue now,
        not when their leases expire (nothing of this router runs them)."""
        taken = []
        for job_id, held_by in queue.holders(self.index).items():
            if job_id in self.running or not _gone(held_by, self.name):
                continue
            try:
                job = queue.apply(self.index, job_id, Expire(now, gone=held_by))
            except IllegalTransition:           # taken over, cancelled or ended meanwhile
                continue
            taken.append(job_id)
            log.warning("job %s: its router %s is gone, now %s", job_id, held_by, job.state)
        self._took_back = True
        return taken

    def study_facts(self, study_uid: str) -> list[SeriesFacts]:
        return [SeriesFacts(s.series_uid, s.modality, s.body_part, s.series_description, s.study_description,
                            s.sop_classes, s.calling_aes) for s in study_series(self.index, study_uid)]

    def _judge(self, rule: CompiledRule, study_uid: str, after: int, upto: int, now: float) -> list[str]:
        """Jobs for the series of a quiet study that `rule` matches and that changed since it last judged."""
        if rule.rule.deid:
            return self._judge_deid(rule, study_uid, after, upto, now)
        plugin = self.plugins[rule.rule.plugin]
        series = [s for s in rule.select(self.study_facts(study_uid))
                  if plugin.accepts.takes(s.modality, sorted(s.sop_classes))]
        changed = series_changed(self.index, study_uid, after, upto, ROUTED)
        if plugin.accepts.per == "study":
            groups = [series] if series and changed & {s.series_uid for s in series} else []
        else:
            groups = [[s] for s in series if s.series_uid in changed]
        made = []
        with self.index.write() as conn:
            if not store.mark_fired(conn, study_uid, rule.name, after, upto):
                return []                       # another router judged the study meanwhile
            for group in groups:
                inputs = [s.series_uid for s in group]
                earlier = queue.latest_of_rule(conn, rule.name, study_uid,
                                               inputs if plugin.accepts.per == "series" else None)
                if earlier is not None and earlier.state == "queued":   # not started: the new job replaces it
                    queue.apply(self.index, earlier.id, Cancel(now, "superseded"), conn)
                made.append(queue.create(self.index, study_uid=study_uid, plugin=plugin.name, params=rule.rule.params,
                                         inputs=inputs, rule=rule.name, created_by=f"rule:{rule.name}",
                                         forward_to=rule.rule.forward_to, max_attempts=self.config.router.max_attempts,
                                         supersedes=earlier.id if earlier is not None else None, now=now, conn=conn))
        for job_id in made:
            log.info("rule %s: job %s (%s) for study %s", rule.name, job_id, plugin.name, study_uid)
        return made

    def _judge_deid(self, rule: CompiledRule, study_uid: str, after: int, upto: int, now: float) -> list[str]:
        """De-identified copies of the study, one export per destination, when one of its series matches and
        something of it changed since the rule last judged it (an export still queued is reused)."""
        matched = bool(rule.select(self.study_facts(study_uid)))
        changed = series_changed(self.index, study_uid, after, upto, ROUTED)
        made = []
        with self.index.write() as conn:
            if not store.mark_fired(conn, study_uid, rule.name, after, upto):
                return []
            if matched and changed:             # the whole study goes, so anything new of it makes a new copy
                for destination in rule.rule.deid_to:
                    made.append(deid_store.create(self.index, study_uid=study_uid, profile=rule.rule.deid,
                                                  destination=destination, rule=rule.name,
                                                  created_by=f"rule:{rule.name}",
                                                  max_attempts=self.config.router.max_attempts, now=now, conn=conn))
        for export_id, destination in zip(made, rule.rule.deid_to):
            log.info("rule %s: export %s (deid %s) of study %s to %s", rule.name, export_id, rule.rule.deid, study_uid,
                     destination)
        return made

    # -- running jobs ---------------------------------------------------------------------

    def expire_leases(self, now: float) -> None:
        for job_id in queue.expired(self.index, now):
            running = self.running.pop(job_id, None)
            if running is not None:
                running.future.cancel()
            try:
                job = queue.apply(self.index, job_id, Expire(now))
                log.warning("job %s: lease expired, now %s", job_id, job.state)
            except IllegalTransition:
                pass

    def dispatch(self, now: float) -> None:
        """Lease queued jobs, as many as the cluster has free worker threads (each job to one router
        only, when several share the index), and submit them."""
        free = self.executor.capacity() - len(self.running)
        if free <= 0:
            return
        now = max(now, self.clock())    # capacity() starts the cluster on first use (seconds): a lease counts from now
        self._waiting = {job_id: until for job_id, until in self._waiting.items() if until > now}
        for job in queue.lease(self.index, self.name, now, self.lease, free, admit=self._inputs_here,
                               skip=self._waiting):
            try:
                spec = self._spec(job)
            except PluginError as exc:
                self._apply(job.id, Fail(now, str(exc), final=True, worker=self.name))
                continue
            future = self.executor.submit(spec, job.attempts, self.plugins[job.plugin].wants_gpu)
            future.add_done_callback(lambda _: self._wake.set())
            self.running[job.id] = _Running(future, job.attempts, now, now)
            log.info("job %s (%s) started, attempt %d of %d", job.id, job.plugin, job.attempts, job.max_attempts)

    def _inputs_here(self, job: queue.JobRecord) -> bool:
        """Whether this node can read the job's inputs now. Instances another running node received and has
        not offloaded yet are only there: the job stays queued, its attempts untouched (that node's router
        may take it meanwhile; this one looks again in INPUTS_RECHECK seconds), instead of failing an
        attempt on them. A node gone for `nodes.ALIVE_SECONDS` is not waited for (the attempt fails with the
        reason)."""
        if self.archive.remote is None:              # one node: everything it holds is here
            return True
        elsewhere = nodes.not_offloaded_elsewhere(self.index, job.inputs, self.archive.node, self.clock)
        if not elsewhere:
            self._told.discard(job.id)
            return True
        if job.id not in self._told:
            self._told.add(job.id)
            log.info("job %s waits: %s not in S3 yet (that node's router may run it)", job.id,
                     ", ".join(f"{n} instances on node {name}" for name, n in elsewhere.items()))
        self._waiting[job.id] = self.clock() + INPUTS_RECHECK
        return False

    def _spec(self, job: queue.JobRecord) -> JobSpec:
        if job.plugin not in self.plugins:
            raise PluginError(f"no plug-in named {job.plugin!r}")
        series = []
        for series_uid in job.inputs:
            found = input_series(self.index, series_uid)
            if found is None:
                raise PluginError(f"series {series_uid} has no instances in the archive")
            series.append(found)
        predecessors = ()
        if job.supersedes:
            predecessors = tuple({k: r[k] for k in ("sop_class_uid", "sop_instance_uid", "series_uid", "study_uid")}
                                 for r in queue.results(self.index, job.supersedes)
                                 if r["kind"] == "dicom" and r["sop_class_uid"] and r["sop_class_uid"].startswith(
                                     "1.2.840.10008.5.1.4.1.1.88."))
        return JobSpec(job.id, job.plugin, job.params, tuple(series), self.config, predecessors)

    def renew(self, now: float) -> None:
        for job_id, running in list(self.running.items()):
            if now - running.renewed >= self.lease / RENEWALS:
                try:
                    queue.apply(self.index, job_id, Renew(now, self.lease, self.name))
                    running.renewed = now
                except IllegalTransition:   # cancelled, expired or taken over meanwhile: collect() lets it go
                    pass

    def collect(self, now: float) -> None:
        if not self.running:
            return
        held = queue.jobs_by_id(self.index, list(self.running))
        timeout = self.config.router.job_timeout
        for job_id, running in list(self.running.items()):
            future = running.future
            job = held.get(job_id)
            if job is None or (job.state, job.worker, job.attempts) != ("running", self.name, running.attempt):
                # cancelled through the API, expired, or taken over by another router
                self._drop(future)
                del self.running[job_id]
                continue
            if not future.done():
                if now - running.started > timeout:
                    future.cancel()
                    del self.running[job_id]
                    self._apply(job_id, Fail(now, f"timed out after {timeout:.0f} s (router.job_timeout)",
                                             worker=self.name))
                continue
            del self.running[job_id]
            self._finish(job_id, future, now)

    def _apply(self, job_id: str, event, **also) -> queue.JobRecord | None:
        """An event of this router on a job it holds; None when the job is no longer its own (cancelled,
        or its lease expired and another router took it over) and the event did not happen."""
        try:
            return queue.apply(self.index, job_id, event, **also)
        except IllegalTransition as exc:
            log.warning("job %s: %s not recorded: %s", job_id, type(event).__name__.lower(), exc)
            return None

    def _finish(self, job_id: str, future, now: float) -> None:
        job = queue.get(self.index, job_id)
        if future.status == "finished":
            output = future.result()
            if isinstance(output, Refused):            # the plug-in refused its input: final, one line
                metrics.get().jobs_finished.labels(job.plugin, "refused").inc()
                job = self._apply(job_id, Fail(now, str(output)[:2000], final=True, worker=self.name))
                if job is not None:
                    log.warning("job %s attempt %d failed (%s): %s", job_id, job.attempts, job.state,
                                str(output)[:300])
                return
            try:
                count = take_results(self.archive, job_id, job.study_uid, output.outputs, self.spool)
            except (IntakeError, OSError) as exc:
                discard(self.archive, output.outputs)
                metrics.get().jobs_finished.labels(job.plugin, "retried").inc()
                self._apply(job_id, Fail(self.clock(), f"results not stored: {exc}", worker=self.name))
                return
            timings = {"worker_started": output.started_at, "plugin_returned": output.returned_at,
                       "stored": self.clock(), "seconds": output.seconds, "backend": output.backend}
            if self._apply(job_id, Succeed(self.clock(), self.name), summary=output.summary, progress=1.0,
                           timings=timings) is None:
                return
            log.info("job %s succeeded: %d results in %.1f s (%s)", job_id, count, output.seconds, output.backend)
            measure = metrics.get()
            measure.jobs_finished.labels(job.plugin, "succeeded").inc()
            measure.plugin_run_seconds.labels(job.plugin).observe(output.seconds)
            if job.forward_to:
                store.queue_forwards(self.index, job_id, job.forward_to, now)
            return
        exc = future.exception() if future.status == "error" else None
        final = isinstance(exc, (PluginError, ParamError))
        error = f"{type(exc).__name__}: {exc}" if exc is not None else f"the task was {future.status}"
        plugin = job.plugin
        job = self._apply(job_id, Fail(now, error[:2000], final=final, worker=self.name))
        if job is not None:
            metrics.get().jobs_finished.labels(plugin, "failed" if job.state == "failed" else "retried").inc()
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
            if not error:
                store.forward_sent(self.index, job_id, destination)
                log.info("job %s: results forwarded to %s", job_id, destination)
            else:
                cap = self.config.router.forward_retry_max_delay
                delay = store.forward_failed(self.index, job_id, destination, error, now,
                                             lambda attempts: backoff(attempts, cap))
                log.warning("job %s: forwarding to %s failed (retry in %.0f s): %s", job_id, destination, delay, error)
        if self._forwarding:
            return
        for key in store.due_forwards(self.index, now, limit=1):
            if not store.claim_forward(self.index, *key, now, now + self.lease):
                continue                        # another router is sending it
            self._forwarding[key] = self._forwarder.submit(forward, self.archive, self.config, *key)
            self._forwarding[key].add_done_callback(lambda _: self._wake.set())


    # -- de-identified exports ---------------------------------------------------------------

    def export_due(self, now: float) -> None:
        """Run the next due export (one at a time, in a thread: reading, de-identifying and sending a study
        takes seconds to minutes); an export whose router died is taken over once its lease ends. A study
        with analysis jobs still queued or running, or a rule still waiting for its quiet period, waits: the
        results of its analyses go with it."""
        for export_id, future in list(self._exporting.items()):
            if future.done():
                del self._exporting[export_id]
        if self._exporting:
            return
        for export_id in deid_store.due(self.index, now):
            export = deid_store.get(self.index, export_id)
            busy = export is not None and export.state == "queued" and (
                store.waiting(self.index, export.study_uid)
                or queue.jobs(self.index, study_uid=export.study_uid, states=("queued", "running"), limit=1))
            if busy:
                deid_store.defer(self.index, export_id, now + EXPORT_WAIT)   # its analysis results go with it
                continue
            future = self._exporter.submit(self._export, export_id)
            future.add_done_callback(lambda _: self._wake.set())
            self._exporting[export_id] = future

    def _export(self, export_id: str) -> None:
        from .deid import export as deid_export          # (its attribute tables: read only when an export runs)

        try:
            deid_export.execute(self.archive, self.config, export_id, self.name,
                               lease=self.lease, clock=self.clock)
        except deid_export.ExportError as exc:      # claimed by another router meanwhile
            log.info("%s", exc)
        except Exception:
            log.exception("export %s", export_id)
