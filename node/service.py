"""Process wiring for `m3dicom serve`: open the archive, recover, listen, stop cleanly."""
from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from archive import check_storage, metrics, nodes, open as open_archive, open_index
from scp.server import check_fast_path
from scp.tls import server_context
from viewer import accounts as viewer_accounts

from . import lock, receivers
from .config import Config
from .owners import open_archive as open_migrated
from .receivers import configure_libraries


def dcmtk(tool: str) -> str:
    """How to call dcmtk's `tool`: its path when an activated virtual environment's scripts (pynetdicom's
    apps of the same names, with other options) come first on PATH, else its name."""
    scripts = Path(sys.prefix) / "bin"
    found = [Path(d) / tool for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    found = [p for p in found if p.is_file() and os.access(p, os.X_OK)]
    if found and found[0].parent != scripts:
        return tool
    dcmtk_own = next((p for p in found if p.parent != scripts), None)
    return str(dcmtk_own) if dcmtk_own else tool


def storescu_hint(config: Config) -> str:
    """A ready-to-paste dcmtk command that sends a file to this node over TLS."""
    d, c = config.dicom, config.client
    return (f"TCP_NODELAY=1 {dcmtk('storescu')} +tls {c.private_key} {c.certificate} +cf {d.ca_certificates} "
            f"-aet {c.ae_title} -aec {config.node.ae_title} {d.host} {d.port} FILE.dcm")

log = logging.getLogger(__name__)


def prepare_spool(config: Config) -> None:
    """Received data sets are spooled inside the data directory (0700), never in /tmp.

    Each receiving process has its own directory below `spool/`. Leftovers of a crash are
    plaintext: they are removed at start.
    """
    spool = config.data_dir / "spool"
    if spool.exists():
        shutil.rmtree(spool)
    spool.mkdir(mode=0o700, parents=True)


def _watch_parent(stop: threading.Event, parent_alive) -> None:
    def watch() -> None:
        while not stop.wait(1.0):
            parent_alive()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def route(config: Config, stop: threading.Event, parent_alive) -> None:
    """The router process (`Children` worker): rules, jobs, the Dask executor, results."""
    from router.service import Router

    archive = open_archive(config)
    router = Router(config, archive)
    log.info("router: %d rules, plug-ins: %s", len(config.router.rules), ", ".join(sorted(router.plugins)) or "none")
    _watch_parent(stop, parent_alive)
    try:
        router.run(stop)
    finally:
        router.close()
        archive.close()


def view(config: Config, sock, stop: threading.Event, parent_alive) -> None:
    """The viewer process (`Children` worker) on the socket the node made."""
    from viewer.serve import run

    _watch_parent(stop, parent_alive)
    run(config, sock, stop)


def operate(config: Config, sock, receivers: int, stop: threading.Event, parent_alive) -> None:
    """The process of the operator's endpoints (`Children` worker): /metrics, /healthz, /readyz."""
    from viewer.ops import run

    _watch_parent(stop, parent_alive)
    run(config, sock, stop, receivers)


def send_audit(config: Config, stop: threading.Event, parent_alive) -> None:
    """The audit sender process (`Children` worker): the outbox to [audit] repository, syslog over TLS."""
    from archive.syslog import Sender
    from scp.tls import client_context

    a, d = config.audit, config.dicom
    host, _, port = a.repository.rpartition(":")
    context = client_context(a.ca_certificates or d.ca_certificates, a.certificate or d.certificate,
                             a.private_key or d.private_key)
    _watch_parent(stop, parent_alive)
    index = open_index(config)
    try:
        Sender(index, config.node.name, host.strip("[]"), int(port), context).run(stop)
    finally:
        index.close()


def audit_application(config: Config, index, start: bool) -> None:
    """Application Activity: the node started or stops (with [audit] repository)."""
    import getpass

    from archive import atna

    if not config.audit.repository:
        return
    event = atna.Event("application-activity", action="E", time=time.time(),
                       event_type="application-start" if start else "application-stop",
                       participants=(atna.Participant(config.node.ae_title, False, "application",
                                                      alternative_id=str(os.getpid())),
                                     atna.Participant(getpass.getuser(), True, "application-launcher")))
    atna.put(index, config.node.name, [(event.time, atna.to_xml(event, config.audit.source_id or config.node.ae_title,
                                                                config.audit.site_id))])


def _audit_stop(config: Config) -> None:
    try:
        index = open_index(config)
        try:
            audit_application(config, index, start=False)
        finally:
            index.close()
    except Exception as exc:     # the index away: the stop is still a stop
        log.error("audit: the node's stop could not be recorded (%s)", type(exc).__name__)


def offload(config: Config, stop: threading.Event, parent_alive) -> None:
    """The offloader process (`Children` worker): push blobs to S3 until stopped."""
    from archive.offload import Offloader, Policy

    st = config.storage
    archive = open_archive(config)
    policy = Policy(concurrency=st.s3.concurrency, retry_max=st.s3.retry_max_delay,
                    cache_max_bytes=st.cache_max_bytes, cache_max_age=st.cache_max_age_days * 86400)
    offloader = Offloader(archive, policy)
    log.info("offloading to s3://%s/%s", st.s3.bucket, st.s3.prefix)
    _watch_parent(stop, parent_alive)
    try:
        offloader.run(stop)
    finally:
        offloader.close()
        archive.close()


def _keep_seen(config: Config, stop: threading.Event) -> None:
    """Record every `nodes.SEEN_EVERY` seconds that this node runs (its name stays its own), until `stop`."""
    def beat() -> None:
        index = open_index(config)
        try:
            while not stop.wait(nodes.SEEN_EVERY):
                try:
                    if not nodes.seen(index, config.node.name, config.data_dir):
                        log.error("node name %r is another data directory's now (a node started under it while "
                                  "this one was not seen for %.0f s): stop this node or the other, and give them "
                                  "different [node] names", config.node.name, nodes.ALIVE_SECONDS)
                except Exception as exc:          # the index away for a while: the next beat tries again
                    log.warning("could not record that node %s runs: %s", config.node.name, exc)
        finally:
            index.close()

    threading.Thread(target=beat, name="node-seen", daemon=True).start()


def serve(config: Config, ready=print) -> None:
    """Run the node until SIGTERM / SIGINT."""
    configure_libraries()
    _more_files()
    config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with lock.exclusive(config.data_dir):   # before anything in it is touched
        os.chmod(config.data_dir, 0o700)
        _serve(config, ready)


def _more_files(wanted: int = 65536) -> None:
    """The soft limit of open files raised to the hard one (at most `wanted`), for this process and the ones it
    starts: a service manager's default soft limit (1,024) is a few hundred idle connections away."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _serve(config: Config, ready) -> None:
    prepare_spool(config)
    d = config.dicom
    server_context(d.certificate, d.private_key, d.ca_certificates)   # a missing certificate stops the start first
    if d.fast_path:
        check_fast_path()                       # another pynetdicom: the start stops here, saying what to do
    s3_warning = check_storage(config)          # no credentials, no such bucket: the start stops here
    if s3_warning:
        log.warning("%s", s3_warning)
    if config.router.enabled:
        from router.service import load_plugins
        load_plugins(config)   # an unknown plug-in or bad parameters stop the start, with the rule named
    archive = open_migrated(config)   # every owner's tables made or brought up to date, before any child starts
    try:   # a name another running node uses stops the start here, before anything is touched
        nodes.register(archive.index, config.node.name, config.data_dir, socket.gethostname())
        # and so do keys that are not the other nodes' (the shared secret made or adopted at the first start)
        viewer_accounts.shared_secret(archive.index, archive.keyring, config.data_dir)
    except BaseException:
        archive.close()
        raise
    archive.recover()   # before any receiver ingests; after the owners' migrations (the router holds its files)
    if config.audit.repository:
        from scp.tls import client_context

        a, d = config.audit, config.dicom   # a certificate that cannot be read stops the start, not the sender
        client_context(a.ca_certificates or d.ca_certificates, a.certificate or d.certificate,
                       a.private_key or d.private_key)
        audit_application(config, archive.index, start=True)
    # every port is taken and every setting checked before the first admin is made: a start
    # that fails must not have printed a password shown only once
    if config.metrics.port:   # every check passed; before any metric is made: every process counts into these files
        metrics.shared(config.data_dir / "metrics")
    sockets, viewer_socket, ops_socket = receivers.listen(config), None, None
    try:
        if config.metrics.port:
            from viewer import ops

            ops.token_of(config, warn=False)            # an unreadable token file stops the start
            ops_socket = ops.listen(config)
        if config.viewer.enabled:
            from viewer import serve as viewer_serve

            viewer_serve.check(config, archive.index, users=False)
            viewer_serve.ssl_context(config)            # a bad certificate stops the start, not the viewer
            viewer_socket = viewer_serve.listen(config)
            viewer_serve.first_admin(archive.index, ready)
            viewer_serve.check(config, archive.index)
    except BaseException:
        for sock in [*sockets.values(), *(s for s in (viewer_socket, ops_socket) if s)]:
            sock.close()
        raise
    finally:
        archive.close()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    count = receivers.receiver_count(config)
    table = receivers.association_table(config, count)
    workers = receivers.receiver_workers(config, sockets, count, table)
    if config.storage.backend == "s3":
        workers["offloader"] = (offload,)
    if config.router.enabled:
        workers["router"] = (route,)
    if viewer_socket is not None:
        workers["viewer"] = (view, viewer_socket)
    if ops_socket is not None:
        workers["ops"] = (operate, ops_socket, count)
    if config.audit.repository:
        workers["audit"] = (send_audit,)
    children = receivers.Children(config, workers)
    _keep_seen(config, stop)

    def announce() -> None:
        d = config.dicom
        ready(f"m3dicom {config.node.ae_title} listening on {d.host}:{d.port} (DICOM TLS)"
              + (f" and {d.host}:{d.plain_port} (plain DICOM)" if d.plain_port else "")
              + f", {count} receiving process{'es' if count > 1 else ''} (dicom.receivers = {d.receivers}"
              + (": one per CPU core)" if d.receivers == 0 else ")"))
        ready(f"data directory: {config.data_dir}"
              + (f", offloading to s3://{config.storage.s3.bucket}/{config.storage.s3.prefix}"
                 if config.storage.backend == "s3" else ""))
        ready(f"send a study: {storescu_hint(config)}")
        if viewer_socket is not None:
            from viewer.serve import address
            ready(f"viewer: {address(config)}")
        if ops_socket is not None:
            from viewer.ops import address as metrics_address
            ready(f"metrics: {metrics_address(config)} (and /healthz, /readyz)")

    try:
        # the children told to stop with receiver 0, not after it: its stop may wait for one of them (the index);
        # the audit sender last, once the node's stop is in its outbox (_audit_stop)
        receivers.receive(config, 0, sockets, stop, announce, children.supervise, table,
                          lambda: children.terminate(but=("audit",)))
        log.info("stopping")
    finally:
        if config.audit.repository:
            _audit_stop(config)
        children.stop()
        for sock in [*sockets.values(), *(s for s in (viewer_socket, ops_socket) if s)]:
            sock.close()
