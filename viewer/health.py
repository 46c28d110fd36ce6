"""The node's readiness checks and what its processes counted, read by the operator's endpoints (ops.py:
/readyz, /metrics) and by the admin page (admin.py): the index takes a write, the data directory's disk is above
storage.min_free_bytes, the key files read, S3 answers (when blobs go there), every receiving process listens.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from archive import metrics
from archive.index import Index

from .settings import Settings

log = logging.getLogger(__name__)
S3_CHECK_EVERY = 30.0        # seconds a reachable bucket's answer is trusted (a scrape every 15 s must not hit S3)
CHECK_TIMEOUT = 5.0          # seconds the S3 check may take before it counts as failed


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    reason: str = ""


class Readiness:
    """The checks behind /readyz, each bounded in time; S3's answer is kept S3_CHECK_EVERY seconds."""

    def __init__(self, config: Settings, index: Index, receivers: int, clock=time.monotonic):
        self.config, self.index, self.receivers, self.clock = config, index, receivers, clock
        self._s3: tuple[float, Check] | None = None
        self._client = None

    def slow(self) -> list[Check]:
        """The checks that wait on others (the index's write lock, S3): run in the background (`Monitor`)."""
        return [self.index_writable(), self.s3()]

    def quick(self) -> list[Check]:
        """The checks of this machine alone, made at each request."""
        return [self.disk(), self.key_file(), self.listening()]

    def index_writable(self) -> Check:
        from archive import nodes

        try:   # the write the node makes every few seconds anyway: it runs, under its own name
            if not nodes.seen(self.index, self.config.node.name, self.config.data_dir):
                return Check("index", False, f"node name {self.config.node.name!r} is another data directory's now")
            return Check("index", True)
        except Exception as exc:   # whatever the engine says, in one line, without values
            return Check("index", False, f"the index does not take a write ({type(exc).__name__})")

    def disk(self) -> Check:
        s = self.config.storage
        try:
            stat = os.statvfs(self.config.data_dir)
        except OSError as exc:
            return Check("disk", False, f"the data directory cannot be read: {exc.strerror}")
        free = stat.f_bavail * stat.f_frsize
        if free < s.min_free_bytes:
            return Check("disk", False, f"{free >> 20} MiB free on the data directory's disk, under "
                                        f"storage.min_free_bytes ({s.min_free_bytes >> 20} MiB): C-STOREs are refused")
        return Check("disk", True)

    def key_file(self) -> Check:
        """Every key-encryption key in the data directory reads whole (the newest wraps each new blob)."""
        from archive.crypto import LocalKeyring

        directory = self.config.data_dir / "keys"
        try:
            if LocalKeyring.open(directory, create=False).current is None:
                return Check("key", False, f"no key file (*.kek) in {directory}")
        except Exception as exc:   # unreadable, damaged (IntegrityError says which file)
            return Check("key", False, f"the key files in {directory} cannot be read: "
                                       f"{getattr(exc, 'strerror', None) or exc}")
        return Check("key", True)

    def s3(self) -> Check:
        if self.config.storage.backend != "s3":
            return Check("s3", True, "not used (storage.backend = \"local\")")
        now = self.clock()
        if self._s3 is not None and now - self._s3[0] < S3_CHECK_EVERY and self._s3[1].ok:
            return self._s3[1]
        from archive import s3 as archive_s3

        st = self.config.storage.s3
        try:
            if self._client is None:
                self._client = archive_s3.client(st.endpoint_url, st.region, CHECK_TIMEOUT, attempts=1)
            problem = archive_s3.check_bucket(self._client, st.bucket)
        except archive_s3.S3SettingsError as exc:
            problem = str(exc)
        except Exception as exc:   # anything else boto3 may raise: not ready, in one line
            problem = f"S3 cannot be checked: {type(exc).__name__}"
        checked = Check("s3", problem is None, problem or "")
        self._s3 = (now, checked)
        return checked

    def listening(self) -> Check:
        registry = counts_registry()
        up = sum(sample.value for family in registry.collect() if family.name == "m3dicom_receivers_listening"
                 for sample in family.samples)
        if up < self.receivers:
            return Check("receivers", False, f"{int(up)} of {self.receivers} receiving processes listening")
        return Check("receivers", True)


def counts_registry():
    """A registry of what the node's processes counted: their files (multiprocess mode), else this process's
    own counts (the metrics port off, a test running the endpoints in-process)."""
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    directory = metrics.multiprocess()
    if directory is None:
        registry.register(_Own(REGISTRY))
    else:
        registry.register(_Files(directory, MultiProcessCollector(None, path=counts_directory(directory))))
    return registry


def counts_directory(directory: str) -> str:
    """The processes' count files' directory, made again if it was removed (the counts of the processes that
    had counted before are then lost to the scrape until the node starts again: it says so)."""
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        log.error("metrics: %s was removed; it is made again, but the counts made before are lost until the node "
                  "restarts", directory)
    return directory


class _Files:
    """prometheus-client's multiprocess collector, its directory made again first if it is gone."""

    def __init__(self, directory: str, inner):
        self.directory, self.inner = directory, inner

    def collect(self):
        counts_directory(self.directory)
        yield from self.inner.collect()


class _Own:
    """This process's default registry, read through (registering its collectors again would not do)."""

    def __init__(self, registry):
        self.registry = registry

    def collect(self):
        yield from self.registry.collect()
