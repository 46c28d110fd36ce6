"""The executor: dask.distributed, embedded (a LocalCluster) or an external scheduler.

Embedded, the cluster starts with the first job: `router.workers` worker processes of one
thread each, with the resource `GPU=n` when CUDA devices are there. Its scheduler marks a
task bad at the first worker that dies under it, so that the router, not Dask, decides on
retries (and counts them on the job). With `router.scheduler`, the node is a client of an
existing cluster (`m3dicom worker` processes, which declare their GPUs); a plug-in that wants
a GPU asks for one only when some worker has one, else it runs with NumPy. The embedded
cluster listens on loopback only; its dashboard (no login) is off unless router.dashboard_port.

A plug-in that refuses its input (PluginError, ParamError: no pixel spacing, a single slice) is
expected, not a fault: the task returns the refusal (`Refused`) instead of raising it, so that
Dask does not log it at ERROR with a traceback ("Compute Failed"); the router fails the job
with its reason in one log line.
"""
from __future__ import annotations

import logging
import queue
from dataclasses import dataclass

from gpu_workers.backend import gpu_count
from gpu_workers.plugin import ParamError, PluginError

from .settings import Settings
from .task import PROGRESS_TOPIC, JobOutput, JobSpec, run_job

log = logging.getLogger(__name__)
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Refused:
    """A plug-in's refusal of its input, as the task's value: "PluginError", and its message."""
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


def run_or_refuse(spec: JobSpec) -> JobOutput | Refused:
    """The task a worker runs: the job, or the plug-in's refusal returned (other exceptions still
    raise: the router retries those, and their traceback helps whoever looks into them)."""
    try:
        return run_job(spec)
    except (PluginError, ParamError) as exc:
        return Refused(type(exc).__name__, str(exc))


def dashboard(port: int) -> tuple[dict, dict]:
    """(LocalCluster's arguments, Dask settings while it starts) for its scheduler's HTTP server,
    which has no login.

    Dask's default (":8787") listens on every address, and a scheduler always starts an HTTP
    server, dashboard or not. Off (port 0): no dashboard, the server answers only /health on a
    free loopback port. On: the dashboard on 127.0.0.1:port, never another address.
    """
    if port:
        return {"dashboard_address": f"{LOOPBACK}:{port}"}, {}
    return ({"dashboard_address": None, "scheduler_kwargs": {"dashboard": False, "dashboard_address": f"{LOOPBACK}:0"}},
            {"distributed.scheduler.http.routes": ["distributed.http.health"]})


# What an idle embedded cluster spends (measured: its scheduler and nanny ~5.6% of a core, its worker ~3.8%,
# waking every 10-20 ms; 3.0% and 0.9% with these), cut: the event loops' blocked-loop check every 500 ms
# instead of 20 ms (a blocked loop is still reported, past `tick.limit`). The worker's statistical profiler
# (a sample every 10 ms) runs only when there is a dashboard to show it (`_start`).
QUIET = {"distributed.admin.tick.interval": "500ms"}


class Executor:
    CONNECT = "15s"     # how long a first connection to an external scheduler, and the client's reconnecting, may take
    RECONNECT = "3s"    # each later attempt, once the client gave up (one a round)

    def __init__(self, config: Settings):
        self.config = config
        self._client = None
        self._cluster = None
        self._lost = False   # the external scheduler was lost: connect again with a short timeout, each round
        self.progress: queue.SimpleQueue = queue.SimpleQueue()   # {"job", "fraction", "message"} from workers

    @property
    def client(self):
        if self._client is None:
            self._start()
        return self._client

    def _start(self) -> None:
        import dask
        from distributed import Client, LocalCluster

        logging.getLogger("distributed").setLevel(max(logging.WARNING, logging.getLogger().getEffectiveLevel()))
        r = self.config.router
        if r.scheduler:
            log.info("connecting to the Dask scheduler at %s", r.scheduler)
            self._client = Client(r.scheduler, timeout=self.RECONNECT if self._lost else self.CONNECT,
                                  set_as_default=False)
            self._lost = False
        else:
            gpus = gpu_count()
            dask.config.set({"distributed.scheduler.allowed-failures": 0, **QUIET,
                             "distributed.worker.profile.enabled": bool(r.dashboard_port)})
            arguments, settings = dashboard(r.dashboard_port)
            with dask.config.set(settings):
                self._cluster = LocalCluster(n_workers=r.workers, threads_per_worker=1, processes=True,
                                             host=LOOPBACK, worker_dashboard_address=None,
                                             resources={"GPU": gpus} if gpus else None, silence_logs=logging.WARNING,
                                             **arguments)
            self._client = Client(self._cluster, set_as_default=False)
            log.info("embedded Dask cluster: %d worker processes%s%s", r.workers, f", {gpus} GPUs" if gpus else "",
                     f", dashboard on http://{LOOPBACK}:{r.dashboard_port}/status (loopback only)"
                     if r.dashboard_port else "")
        self._client.subscribe_topic(PROGRESS_TOPIC, lambda event: self.progress.put(event[1]))

    def _workers(self) -> dict:
        return self.client.scheduler_info(n_workers=-1).get("workers", {})

    def capacity(self) -> int:
        """Jobs that can run at once: the cluster's worker threads (at least 1); none while the client has lost
        its scheduler. Asking a client that is reconnecting blocks until it has (up to the 15 s it tries): the
        router's loop, and a stop of the node, waited that long. A client that gave up is dropped: the next rounds
        connect again, each waiting at most RECONNECT for the scheduler."""
        client = self.client
        if client.status != "running":
            if client.status == "closed":
                log.warning("lost the Dask scheduler at %s: connecting again", self.config.router.scheduler)
                self._client, self._lost = None, True
            return 0
        return max(1, sum(w.get("nthreads", 1) for w in self._workers().values()))

    def has_gpus(self) -> bool:
        return any(w.get("resources", {}).get("GPU", 0) for w in self._workers().values())

    def submit(self, spec: JobSpec, attempt: int, wants_gpu: bool):
        resources = {"GPU": 1} if wants_gpu and self.has_gpus() else None
        return self.client.submit(run_or_refuse, spec, key=f"m3dicom-job-{spec.job_id}-{attempt}", pure=False,
                                  resources=resources)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        if self._cluster is not None:
            self._cluster.close()
        self._client = self._cluster = None
