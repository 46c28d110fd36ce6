"""The node's measurements, for Prometheus: one catalogue that every package counts into.

It lives in archive/, the bottom layer, so that scp/, router/ and viewer/ can all import it (it
holds no SQL). The node's processes (receivers, offloader, router, viewer) each count for themselves;
prometheus-client's multiprocess mode adds them up when `/metrics` is scraped (viewer/ops.py). That
mode is chosen by prometheus-client when it is first imported, from PROMETHEUS_MULTIPROC_DIR, so
`shared(directory)` must run before any metric is made: nothing here imports prometheus-client until
then, and `shared` refuses to run too late. Without it (the metrics port off, tests that run a part
in-process) the metrics count in the process's memory, and nothing is written.

Labels take only bounded values: a calling AE title is one of the first `AE_TITLES_KEPT` seen by the
process, then "other" (a peer choosing a new title per association must not grow the scrape).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
ENVIRONMENT = "PROMETHEUS_MULTIPROC_DIR"
AE_TITLES_KEPT = 64
# seconds: from a few milliseconds (a small instance on a fast disk) to minutes (a slow sender's 2 GB)
STORE_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
QUERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
RUN_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class MetricsError(RuntimeError):
    """Multiprocess metrics asked for after prometheus-client was imported without them."""


@dataclass(frozen=True)
class Metrics:
    associations_open: Any
    associations: Any
    associations_rejected: Any
    connections_refused: Any
    tls_handshake_failures: Any
    receivers_listening: Any
    instances_received: Any
    bytes_received: Any
    store_seconds: Any
    stores_refused: Any
    dimse_requests: Any
    dimse_seconds: Any
    index_transaction_seconds: Any
    s3_errors: Any
    plugin_run_seconds: Any
    jobs_finished: Any
    http_requests: Any
    http_request_seconds: Any


def shared(directory: Path) -> None:
    """Count into files under `directory` (emptied: counts start at zero with the node), in this process and
    the processes it starts from now on. Must come before the first metric is made."""
    if "prometheus_client" in sys.modules and os.environ.get(ENVIRONMENT) != str(directory):
        raise MetricsError("prometheus-client was imported before the node chose where its processes count "
                           "(archive.metrics.shared must run first)")
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(mode=0o700, parents=True)
    os.environ[ENVIRONMENT] = str(directory)


def multiprocess() -> str | None:
    """The directory the processes count into, or None (counts in this process's memory)."""
    return os.environ.get(ENVIRONMENT) or None


def process_gone(pid: int) -> None:
    """A process of the node ended: its live values (open associations, listening) stop counting."""
    if multiprocess():
        from prometheus_client import multiprocess as mp
        mp.mark_process_dead(pid)


class _Safe:
    """A metric whose failure never reaches the work it counts: a C-STORE stored is answered stored even when
    its count cannot be written (data_dir/metrics removed under the node: the file of a process that had not
    counted yet cannot be made). The failure is logged, once a minute at most."""

    __slots__ = ("_metric",)

    def __init__(self, metric):
        self._metric = metric

    def labels(self, *values) -> "_Safe":
        try:
            return _Safe(self._metric.labels(*values))
        except Exception as exc:
            _failed(exc)
            return _NOTHING

    def inc(self, amount: float = 1) -> None:
        try:
            self._metric.inc(amount)
        except Exception as exc:
            _failed(exc)

    def dec(self, amount: float = 1) -> None:
        try:
            self._metric.dec(amount)
        except Exception as exc:
            _failed(exc)

    def set(self, value: float) -> None:
        try:
            self._metric.set(value)
        except Exception as exc:
            _failed(exc)

    def observe(self, value: float) -> None:
        try:
            self._metric.observe(value)
        except Exception as exc:
            _failed(exc)

    @contextlib.contextmanager
    def time(self):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.observe(time.perf_counter() - started)


class _Nothing(_Safe):
    def __init__(self):
        super().__init__(None)

    def labels(self, *values) -> "_Safe":
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    dec = inc

    def set(self, value: float) -> None:
        pass

    observe = set


_NOTHING = _Nothing()
_last_failure = [0.0]


def _failed(exc: Exception) -> None:
    now = time.monotonic()
    if now - _last_failure[0] >= 60.0:
        _last_failure[0] = now
        log.error("metrics: a count could not be written (%s: %s); the work it counts goes on",
                  type(exc).__name__, exc)


@functools.cache
def get() -> Metrics:
    """The catalogue, made on first use (in each process). Counting never stops the work it counts: when the
    catalogue cannot be made (the processes' directory removed and not to be made again), nothing is counted
    in this process, and that is logged."""
    from prometheus_client import Counter, Gauge, Histogram

    try:
        directory = multiprocess()
        if directory:
            os.makedirs(directory, mode=0o700, exist_ok=True)     # removed under the node: its files go there
        made = _catalogue(Counter, Gauge, Histogram)
    except Exception as exc:
        _failed(exc)
        return Metrics(**{f.name: _NOTHING for f in dataclasses.fields(Metrics)})
    return Metrics(**{name: _Safe(metric) for name, metric in made.items()})


def _catalogue(Counter, Gauge, Histogram) -> dict:
    return dict(
        associations_open=Gauge("m3dicom_associations_open", "DICOM associations open now.",
                                multiprocess_mode="livesum"),
        associations=Counter("m3dicom_associations", "DICOM associations accepted, by calling AE title.",
                             ["calling_ae"]),
        associations_rejected=Counter("m3dicom_associations_rejected",
                                      "A-ASSOCIATE-RQ answered with a rejection, by reason.", ["reason"]),
        connections_refused=Counter("m3dicom_connections_refused",
                                    "Connections closed before their association request, by reason.", ["reason"]),
        tls_handshake_failures=Counter("m3dicom_tls_handshake_failures", "TLS handshakes that failed, by reason.",
                                       ["reason"]),
        receivers_listening=Gauge("m3dicom_receivers_listening", "Receiving processes serving the DICOM ports.",
                                  multiprocess_mode="livesum"),
        instances_received=Counter("m3dicom_instances_received", "Instances stored from C-STORE, by calling AE.",
                                   ["calling_ae"]),
        bytes_received=Counter("m3dicom_received_bytes", "Data set bytes stored from C-STORE, by calling AE.",
                               ["calling_ae"]),
        store_seconds=Histogram("m3dicom_store_seconds", "C-STORE: from the data set's last fragment to the "
                                "answer (durable: blob fsynced, index committed).", buckets=STORE_BUCKETS),
        stores_refused=Counter("m3dicom_stores_refused", "C-STORE answered with a failure, by status.", ["status"]),
        dimse_requests=Counter("m3dicom_dimse_requests", "C-FIND, C-MOVE and C-GET requests, by service and "
                               "final status class.", ["service", "outcome"]),
        dimse_seconds=Histogram("m3dicom_dimse_seconds", "C-FIND, C-MOVE and C-GET: from the request to the final "
                                "answer, by service.", ["service"], buckets=QUERY_BUCKETS),
        index_transaction_seconds=Histogram("m3dicom_index_transaction_seconds",
                                            "The index transaction that files one received instance.",
                                            buckets=STORE_BUCKETS),
        s3_errors=Counter("m3dicom_s3_errors", "S3 requests of the offloader that failed, by operation.",
                          ["operation"]),
        plugin_run_seconds=Histogram("m3dicom_plugin_run_seconds", "Analysis plug-in runs, by plug-in.",
                                     ["plugin"], buckets=RUN_BUCKETS),
        jobs_finished=Counter("m3dicom_jobs_finished", "Analysis jobs ended, by plug-in and state.",
                              ["plugin", "state"]),
        http_requests=Counter("m3dicom_http_requests", "Viewer and DICOMweb requests, by route and status.",
                              ["route", "method", "status"]),
        http_request_seconds=Histogram("m3dicom_http_request_seconds", "Viewer and DICOMweb requests, by route.",
                                       ["route"], buckets=QUERY_BUCKETS),
    )


_titles: set[str] = set()
_titles_lock = threading.Lock()


def ae_label(title: str | None) -> str:
    """A calling AE title as a label value: one of the first `AE_TITLES_KEPT` of this process, else "other"."""
    title = (title or "").strip() or "(none)"
    if title in _titles:
        return title
    with _titles_lock:
        if len(_titles) < AE_TITLES_KEPT:
            _titles.add(title)
            return title
    return "other"
