"""The `m3dicom` command line. `main(args=None)` so that tests can call it."""
from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from . import __version__
from .config import Config, ConfigError, load


def _config(args) -> Config:
    return load(args.config)


def cmd_serve(args) -> int:
    from .receivers import banner, configure_logging
    from .service import serve

    config = _config(args)
    configure_logging(config, sys.stderr)
    try:
        serve(config, ready=banner(config))
    except RuntimeError as exc:
        print(f"m3dicom: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_certs_init(args) -> int:
    from certs import pki

    written = pki.init(Path(args.dir), tuple(args.host or ()), force=args.force)
    for path in written:
        print(f"wrote {path}")
    return 0


def cmd_certs_issue_client(args) -> int:
    from certs import pki

    cert, key = pki.issue_client(Path(args.dir), args.name, force=args.force)
    print(f"wrote {cert}\nwrote {key}")
    return 0


def _peer(args, config: Config):
    from scp.scu import Peer
    from scp.tls import client_context

    d, c = config.dicom, config.client
    port = args.port or (d.plain_port if args.no_tls else d.port)
    if not port:
        raise ConfigError("no port: pass --port (dicom.plain_port is 0, so the node has no plain port)")
    tls = None
    if not args.no_tls:
        tls = client_context(Path(args.ca or d.ca_certificates), Path(args.cert or c.certificate),
                             Path(args.key or c.private_key), check_hostname=not args.no_hostname_check)
    return Peer(args.host or d.host, port, args.called_ae or config.node.ae_title,
                args.calling_ae or c.ae_title, tls)


def cmd_echo(args) -> int:
    from scp.scu import echo

    status = echo(_peer(args, _config(args)))
    print(f"C-ECHO status 0x{status:04X}")
    return 0 if status == 0 else 1


def cmd_send(args) -> int:
    from tqdm import tqdm

    from scp.scu import find_files, send

    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:
        print(f"m3dicom: no such file or directory: {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    peer = _peer(args, _config(args))
    files = find_files(args.paths)
    with tqdm(total=len(files), unit="file", disable=args.quiet or None) as bar:
        report = send(peer, files, progress=bar.update)
    for path, why in report.skipped:
        print(f"skipped {path}: {why}", file=sys.stderr)
    for path, why in report.failed:
        print(f"failed  {path}: {why}", file=sys.stderr)
    print(f"sent {report.sent}, failed {len(report.failed)}, skipped {len(report.skipped)}")
    return 0 if not report.failed else 1


def cmd_status(args) -> int:
    import time

    from archive import status as archive_status
    from archive.offload import status
    from scp import db as scp_db

    from .owners import open_index

    config = _config(args)
    index = open_index(config)
    try:
        held = archive_status.counts(index)
        shared = bool(config.index.url)
        print(f"node: {config.node.name}, data directory: {config.data_dir}")
        print("index: " + (f"shared, {config.index.url} (every node's studies, jobs and users)" if shared
                           else "SQLite in the data directory"))
        print(f"archive: {held.instances} instances in {held.studies} studies")
        c = index.integrity()   # instances that disagreed with the index (ingest.on_conflict)
        held = f" ({c['in_quarantine']} still held)" if c["in_quarantine"] != c["quarantined"] else ""
        print(f"conflicts: {c['refused']} instances refused, {c['quarantined']} kept in quarantine{held}, "
              f"{c['stored']} stored whose patient data differs from the index, "
              f"{c['discarded']} received again with other bytes and discarded"
              + ("; list them: m3dicom status --conflicts" if any(c.values()) and not args.conflicts else ""))
        if args.conflicts:
            _print_conflicts(archive_status.conflicts(index))
        _print_forwards(index)
        reports = scp_db.report_counts(index)
        if reports.waiting or reports.given_up:
            print(f"storage commitment: {reports.waiting} reports waiting to be delivered, {reports.given_up} "
                  "given up (the requester has to ask again)")
        if config.audit.repository:
            from archive import atna

            count, oldest = atna.waiting(index, config.node.name)
            print(f"audit: {count} messages waiting for {config.audit.repository}"
                  + (f" (oldest from {time.time() - oldest:.0f} s ago)" if oldest else ""))
        if config.storage.backend != "s3":
            print("offload: off (storage.backend = \"local\")")
            return 0
        s = status(index, config.node.name if shared else None)
        print(f"offload to s3://{config.storage.s3.bucket}/{config.storage.s3.prefix}"
              + (f" (what this node, {config.node.name}, received):" if shared else ":"))
        print(f"  pending   {s.pending}" + (f" ({s.retrying} waiting to retry)" if s.retrying else ""))
        print(f"  offloaded {s.offloaded} ({s.evicted} evicted from the local cache)")
        print(f"  failed    {s.failed}")
        if s.removing:
            print(f"  to delete {s.removing}")
        print(f"  local cache: {s.local_bytes / 1e6:.1f} MB")
        if s.oldest_pending is not None:
            print(f"  oldest pending: queued {time.time() - s.oldest_pending:.0f} s ago")
        if s.last_error:
            print(f"  last error: {s.last_error}")
        return 1 if s.failed else 0
    finally:
        index.close()


_CONFLICT_REASONS = {"PatientID": "its study belongs to another patient",
                     "StudyInstanceUID": "its series belongs to another study"}
_CONFLICT_ADVICE = {
    "refused": "not stored: correct it at the sender and send it again (or set ingest.on_conflict = \"quarantine\")",
    "quarantined": "stored outside its study: no query, retrieve or viewer sees it",
    "stored": "stored in its study; its file keeps its own values, the index (and C-FIND) the first ones received",
    "discarded": "not stored: the copy stored first was kept (storage.duplicates = \"keep-first\"), and storage "
                 "commitment does not confirm this UID: find out at the sender which copy is right",
}


def _print_forwards(index, job_id: str | None = None, indent: str = "") -> None:
    """Analysis results on their way to the rules' `forward_to` nodes (nothing when none)."""
    from router import queue

    for f in queue.forwards(index, job_id):
        if f.state == "sent":
            print(f"{indent}forwarded to {f.destination}: {f.count} results sent")
            continue
        print(f"{indent}forwarding to {f.destination}: {f.count} {f.state}"
              + (f" after {f.attempts} attempts" if f.attempts else "")
              + (f"; last error: {f.last_error[:200]}" if f.last_error else "")
              + (" (retried with backoff; check the [remote] node)" if f.state == "pending" and f.attempts else ""))


def _print_conflicts(conflicts) -> None:
    """One block per instance, newest first: what it contradicted, and what became of it."""
    import time
    from itertools import groupby

    for (uid, action), group in groupby(conflicts, key=lambda c: (c.sop_instance_uid, c.action)):
        group = list(group)
        first = group[0]
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(first.time))
        print(f"{when}  {action}  from {first.calling_ae or 'an upload or a plug-in'}"
              + (f" (received {first.received} times)" if first.received > 1 else ""))
        print(f"  instance {uid}")
        print(f"  study    {first.study_uid}")
        print(f"  series   {first.series_uid}")
        for c in group:
            what = c.reason or _CONFLICT_REASONS.get(c.attribute, f"{c.attribute} differs")
            print(f"  {what}: the index has {c.index_value or '(empty)'!r}, "
                  f"the instance {c.instance_value or '(empty)'!r}")
        print(f"  -> {_CONFLICT_ADVICE.get(action, action)}")


def cmd_keys_rotate(args) -> int:
    from tqdm import tqdm

    from archive.keys import rotate, work
    from router.deid import store as deid_store
    from viewer.accounts import rewrap_secret

    from .owners import open_archive

    config = _config(args)
    archive = open_archive(config)
    try:
        total = sum(map(len, work(archive)))
        with tqdm(total=total, unit="blob", disable=args.quiet or None) as bar:
            report = rotate(archive, progress=bar.update, new_key=lambda: (
                rewrap_secret(archive.index, archive.keyring), deid_store.rewrap(archive.index, archive.keyring)))
    finally:
        archive.close()
    print(f"new key-encryption key {report.key_id}: re-wrapped {report.local} local blobs and "
          f"{report.remote} objects in S3 ({report.unchanged} already current, {len(report.failed)} failed)")
    if config.index.url and not config.crypto.kms_key_id:
        print(f"nodes share this index: copy the new key file {config.data_dir / 'keys'}/{report.key_id}.kek "
              "(0600) into every other node's data_dir/keys now; until then they cannot read what was re-wrapped "
              "(they pick it up without a restart)")
    for blob_id, why in report.failed:
        print(f"failed  {blob_id}: {why}", file=sys.stderr)
    return 1 if report.failed else 0


def _params(pairs: list[str] | None) -> dict:
    params = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param {pair!r}: expected NAME=VALUE")
        params[key.strip()] = value.strip()
    return params


def cmd_plugin_list(args) -> int:
    import json

    from gpu_workers.plugin import describe, discover

    plugins = discover(_config(args).router.plugins)
    if args.json:
        print(json.dumps([describe(p) for p in plugins.values()], indent=2))
        return 0
    for plugin in plugins.values():
        takes = ", ".join(plugin.accepts.modalities) or "any modality"
        print(f"{plugin.name} {plugin.version}: {plugin.title} (takes {takes}, per {plugin.accepts.per}"
              f"{', wants a GPU' if plugin.wants_gpu else ''})")
        for p in plugin.params:
            print(f"    {p.name} ({p.type}, default {p.default!r}): {p.help}")
    return 0


def cmd_plugin_run(args) -> int:
    from tqdm import tqdm

    from gpu_workers.local import run_local
    from gpu_workers.plugin import ParamError, PluginError, discover
    from scp.scu import find_files

    plugins = discover(_config(args).router.plugins)
    if args.name not in plugins:
        print(f"m3dicom: no plug-in named {args.name!r} (installed: {', '.join(sorted(plugins)) or 'none'})",
              file=sys.stderr)
        return 2
    with tqdm(total=100, unit="%", disable=args.quiet or None, bar_format="{l_bar}{bar}| {desc}") as bar:
        def progress(fraction: float, message: str = "") -> None:
            bar.n = round(100 * fraction)
            bar.set_description_str(message)
            bar.refresh()
        try:
            summary = run_local(plugins[args.name], find_files(args.paths), _params(args.param), Path(args.out),
                                progress)
        except (PluginError, ParamError) as exc:
            print(f"m3dicom: {args.name}: {exc}", file=sys.stderr)
            return 1
    print(f"wrote {', '.join(summary['written'])} and summary.json to {args.out} ({summary['backend']})")
    return 0


def cmd_worker(args) -> int:
    """A Dask worker for an external cluster: this machine's plug-ins, and its GPUs as a resource."""
    import os
    import socket

    from gpu_workers.backend import gpu_count
    from gpu_workers.plugin import discover

    from .worker import CONFIG_ENV

    config = _config(args)
    plugins = discover(config.router.plugins)  # fail here, not in the first job, when one is broken
    gpus = gpu_count() if args.gpus is None else args.gpus
    command = [sys.executable, "-m", "distributed.cli.dask_worker", args.scheduler, "--nthreads", "1",
               "--nworkers", str(args.nworkers), "--name", f"m3dicom-{socket.gethostname()}-{os.getpid()}",
               "--no-dashboard"]
    if gpus:
        command += ["--resources", f"GPU={gpus}"]
    if args.config:   # this machine's own settings, installed on each worker process (node/worker.py)
        os.environ[CONFIG_ENV] = str(Path(args.config).resolve())
        command += ["--preload", "node.worker"]
    print(f"m3dicom worker for {args.scheduler}: {args.nworkers} process(es), {gpus} GPU(s), "
          f"plug-ins: {', '.join(sorted(plugins)) or 'none'}", flush=True)
    os.execv(sys.executable, command)
    return 0  # pragma: no cover


@contextmanager
def _index_of(args):
    """The node's index for one command (migrated by every owner), closed after it."""
    from .owners import open_index

    index = open_index(_config(args))
    try:
        yield index
    finally:
        index.close()


def cmd_jobs_list(args) -> int:
    import time

    from router import queue

    with _index_of(args) as index:
        found = queue.jobs(index, study_uid=args.study, states=tuple(args.state or ()), limit=args.limit)
        if not found:
            print("no jobs" + (" for this study" if args.study else "") + (" in that state" if args.state else ""))
        for job in found:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.created_at))
            print(f"{job.id} {job.state:9} {job.plugin} study {job.study_uid} attempts {job.attempts}/"
                  f"{job.max_attempts} created {when}" + (f" [{job.rule}]" if job.rule else ""))
            if job.state == "running" and job.lease_expires:      # which node's router runs it (several may)
                until = time.strftime("%H:%M:%S", time.localtime(job.lease_expires))
                print(f"    held by {job.worker}, lease until {until}")
            if job.errors:
                print(f"    last error: {job.errors[-1][:300]}")
            _print_forwards(index, job.id, "    ")
    return 0


def cmd_jobs_run(args) -> int:
    from gpu_workers.plugin import discover
    from router.api import JobRequestError, request_job

    config = _config(args)
    try:
        with _index_of(args) as index:
            made = request_job(index, discover(config.router.plugins), study_uid=args.study, plugin=args.plugin,
                               params=_params(args.param), series=args.series, created_by="cli",
                               max_attempts=config.router.max_attempts)
    except JobRequestError as exc:
        print(f"m3dicom: {exc}", file=sys.stderr)
        return 1
    print("queued " + ", ".join(made))
    return 0


def cmd_jobs_cancel(args) -> int:
    from router.api import cancel
    from router.jobs import IllegalTransition
    from router.queue import JobNotFound

    try:
        with _index_of(args) as index:
            job = cancel(index, args.id)
    except (IllegalTransition, JobNotFound) as exc:
        print(f"m3dicom: cannot cancel {args.id}: {exc}", file=sys.stderr)
        return 1
    print(f"{job.id} {job.state}")
    return 0


def cmd_viewer(args) -> int:
    """The viewer alone (scale-out: several behind a proxy), until SIGTERM / SIGINT."""
    import signal
    import threading

    from viewer import serve as viewer_serve

    from .owners import open_index
    from .receivers import configure_logging

    config = _config(args)
    configure_logging(config, sys.stderr)
    index = open_index(config)
    try:
        viewer_serve.check(config, index)
    finally:
        index.close()
    sock = viewer_serve.listen(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    viewer_serve.run(config, sock, stop, ready=lambda: print(f"viewer: {viewer_serve.address(config)}", flush=True))
    return 0


def _password(args) -> str:
    import getpass

    if sys.stdin.isatty():
        first = getpass.getpass("password: ")
        if first != getpass.getpass("again: "):
            raise RuntimeError("the two passwords differ")
        return first
    return sys.stdin.readline().rstrip("\n")


@contextmanager
def _index_made(config: Config):
    """The node's index, made if the node has not started yet (the data directory 0700, as
    `serve` makes it, and the index with its migrations): users may be added before the first
    start. The serve lock is not taken: a running node and this command may use the index
    together (SQLite orders their writes). Yields (index, whether it was made now)."""
    from archive.index import Index

    from .owners import migrate

    path = config.data_dir / "index.sqlite3"
    made = not config.index.url and not path.exists()
    if made:
        config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    index = Index(config.index.url or path)
    try:
        migrate(index)
        yield index, made
    finally:
        index.close()


def _cli_audit(index, action: str, detail: str, study_uid: str | None = None) -> None:
    """A change made from the command line, in the viewer's audit trail, by the system user who ran it."""
    import getpass

    from viewer.accounts import audit

    try:
        who = getpass.getuser()
    except (KeyError, OSError):      # a uid without a name (a container's --user), no USER or LOGNAME
        who = f"uid{os.getuid()}"
    audit(index, f"cli:{who}", action, detail=detail[:500], study_uid=study_uid)


def cmd_user_add(args) -> int:
    from viewer.accounts import AccountError, UserExists, add_user, check_user, user_rows

    try:
        config = _config(args)
        password = _password(args)
        check_user(args.name, password, args.role or "clinician", args.referring if args.role else None,
                   new=not args.replace)                                # before anything is made
        with _index_made(config) as (index, made):
            old = next((u for u in user_rows(index) if u["name"] == args.name), None) if args.replace else None
            role, referring = args.role or "clinician", args.referring
            if old is not None and args.role is None:          # a new password (a reader's name): the role stays
                role, referring = old["role"], referring or old["referring"]
            check_user(args.name, password, role, referring, new=old is None)
            user = add_user(index, args.name, password, role, replace=args.replace, referring=referring)
            what = "user_password" if old is not None and (old["role"], old["referring"]) == (role, referring) \
                else "user_role" if old is not None else "user_add"
            _cli_audit(index, what, f"{user.name}: role {user.role}"
                       + (f" (studies referred by {user.referring})" if user.referring else "")
                       + (", new password" if old is not None else "")
                       + (", enabled again" if old is not None and old["disabled"] else ""))
    except (AccountError, RuntimeError, OSError) as exc:
        hint = {UserExists: f" (give them a new password with `m3dicom user add {args.name} --replace`)"}
        referring = " (--referring 'FAMILY^GIVEN')" if "referring physician" in str(exc) else ""
        print(f"m3dicom: {exc}{hint.get(type(exc), referring)}", file=sys.stderr)
        return 1
    if made:
        print(f"made the node's index at {config.data_dir / 'index.sqlite3'} (the node had not started yet; "
              "its first start uses it and, since a user exists, makes no `admin` user)")
    sees = f", sees the studies referred by {user.referring}" if user.referring else ""
    print(f"user {user.name} ({user.role}{sees}) {'updated' if args.replace else 'added'}"
          + (" and enabled again" if old is not None and old["disabled"] else ""))
    return 0


def _switch_user(args, action: str, change, done: str) -> int:
    """Disable or enable a user (`change`: the accounts function), audited; 1 with the reason when refused."""
    from viewer.accounts import AccountError

    with _index_of(args) as index:     # migrated: an index no node has served yet has no users, not no table
        try:
            changed = change(index, args.name)
        except AccountError as exc:
            print(f"m3dicom: {exc} (`m3dicom user add NAME --role admin`)", file=sys.stderr)
            return 1
        if changed:
            _cli_audit(index, action, f"{args.name}: {action.removeprefix('user_')}d")
    if not changed:
        print(f"m3dicom: no user {args.name!r}", file=sys.stderr)
        return 1
    print(f"user {args.name} {done}")
    return 0


def cmd_user_disable(args) -> int:
    from viewer.accounts import disable_user

    return _switch_user(args, "user_disable", disable_user, "disabled; their sessions have ended "
                        f"(`m3dicom user enable {args.name}` enables it again)")


def cmd_user_enable(args) -> int:
    from viewer.accounts import enable_user

    return _switch_user(args, "user_enable", enable_user, "enabled: they can log in again with their password")


def cmd_user_list(args) -> int:
    from viewer.accounts import user_rows

    with _index_of(args) as index:
        for user in user_rows(index):
            sees = f" (studies referred by {user['referring']})" if user["referring"] else ""
            print(f"{user['name']} {user['role']}{sees}{' (disabled)' if user['disabled'] else ''}")
    return 0


def _profile(config: Config, given: str | None) -> str:
    if given:
        if given not in config.deid:
            raise RuntimeError(f"no [deid.{given}] profile (configured: {', '.join(config.deid) or 'none'})")
        return given
    if not config.deid:
        raise RuntimeError("the configuration has no [deid.NAME] profile (give --config FILE, the node's "
                           "configuration; docs/deid.md)")
    if len(config.deid) != 1:
        raise RuntimeError(f"give --profile NAME: the profiles are {', '.join(config.deid)}")
    return next(iter(config.deid))


def cmd_deid_secret(args) -> int:
    from router.deid.export import make_secret

    config = _config(args)
    name = _profile(config, args.profile)
    path = make_secret(config, name, replace=args.rotate)
    with _index_made(config) as (index, _):
        _cli_audit(index, "deid_secret", f"deid:{name}: {'rotated' if args.rotate else 'made'}")
    print(f"the secret of [deid.{name}] is in {path} (mode 0600); keep a copy where the node's keys are kept"
          + ("; copies made from now on have new pseudonyms and UIDs" if args.rotate else ""))
    return 0


LEASE = 60.0          # seconds a hand-made export's lease lasts (renewed every quarter): a router takes it over
#                       (or fails it, on its one attempt) only once this process is gone


def cmd_deid_export(args) -> int:
    """De-identified copies of a study, made and sent from here, with a progress bar; the export is recorded
    like the router's, so `deid list` and the study page show it."""
    import socket

    from tqdm import tqdm

    import logging

    from archive.inputs import uid_kind
    from router.deid import store
    from router.deid.export import check_destination, execute, read_secret

    from .owners import open_archive

    config = _config(args)
    name = _profile(config, args.profile)
    check_destination(config, args.to)
    read_secret(config, name)                       # refused before anything is recorded
    logging.getLogger("router.deid.export").setLevel(logging.CRITICAL)  # a failure is said once, below
    archive = open_archive(config)
    try:
        kind = uid_kind(archive.index, args.study)
        if kind != "study":
            raise RuntimeError(f"{args.study} is " + (f"a {kind.replace('_', ' ')} UID, not a Study Instance UID"
                                                       if kind else "not a study this node holds"))
        worker = f"{socket.gethostname()}/cli-{os.getpid()}"
        export_id = store.create_running(archive.index, study_uid=args.study, profile=name, destination=args.to,
                                         created_by="cli", worker=worker, lease=LEASE)
        _cli_audit(archive.index, "deid_export", f"-> {args.to} (deid:{name}, export {export_id})", args.study)
        with tqdm(total=0, unit="instance", disable=args.quiet or None) as bar:
            def progress(outcome) -> None:
                bar.total = outcome.total
                bar.n = outcome.sent + outcome.dropped
                bar.refresh()
            done = execute(archive, config, export_id, worker, lease=LEASE, progress=progress, claimed=True)
    finally:
        archive.close()
    if done.state != "succeeded":
        print(f"m3dicom: export {export_id} failed: {done.error}", file=sys.stderr)
        return 1
    print(f"export {export_id}: {done.sent} {'copy' if done.sent == 1 else 'copies'} sent to {done.destination} "
          f"as {done.pseudonym}"
          + (f", {done.dropped} dropped (may show burned-in text)" if done.dropped else ""))
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: at least 1")
    return value


def cmd_deid_list(args) -> int:
    import time

    from router.deid import store

    with _index_of(args) as index:
        found = store.exports(index, args.study, args.limit)
        if not found:
            print("no export" + (f" of study {args.study}" if args.study else "") + " yet", file=sys.stderr)
        for e in found:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.created_at))
            counts = (f"{e.sent or 0}/{e.total or 0} sent, {e.dropped or 0} left out"
                      + (f", as {e.pseudonym}" if e.pseudonym else ""))
            print(f"{e.id} {when} {e.state} study {e.study_uid} -> {e.destination} (deid:{e.profile}, {counts})"
                  + (f": {e.error}" if e.error else ""))
    return 0


def _pseudonyms_of(config: Config, patient_id: str, issuer: str) -> list[str]:
    """The pseudonym each project (with its secret) gives this original patient."""
    from router.deid.engine import Keys, key_of
    from router.deid.export import ExportError, read_secret

    found = []
    for name, profile in config.deid.items():
        try:
            keys = Keys(read_secret(config, name))
        except ExportError:
            continue
        found.append(keys.pseudonym(key_of(patient_id, issuer), profile.pseudonym_prefix))
    return found


def cmd_deid_lookup(args) -> int:
    """Who a pseudonym is: for the people allowed to know (whoever may read the node's keys), audited."""
    import json
    import re

    from router.deid import store

    from .owners import open_archive

    config = _config(args)
    wanted = args.pseudonym.strip()
    if not re.fullmatch(r"[0-9.]+", wanted):        # pseudonyms are capitals (a copy's Study UID is digits)
        wanted = wanted.upper()
    if args.patient_id:                             # the original patient: their pseudonym in each project
        wanted = _pseudonyms_of(config, args.pseudonym.strip(), args.issuer or "")
    archive = open_archive(config)
    try:
        found = [entry for name in ([wanted] if isinstance(wanted, str) else wanted)
                 for entry in store.lookup(archive.index, archive.keyring, name)]
        _cli_audit(archive.index, "deid_lookup", f"{'patient ' if args.patient_id else ''}{args.pseudonym}: "
                   f"{'found' if found else 'unknown'}")
    finally:
        archive.close()
    if not found:
        print(f"m3dicom: no {'copy of patient' if args.patient_id else 'pseudonym or copied study'} "
              f"{args.pseudonym!r}" + (" under any project's current secret (give --issuer if the studies carry "
                                       "one; copies made under a secret since rotated are found by their pseudonym)"
                                       if args.patient_id else ""), file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    for entry in found:
        patient = entry["patient"] or {}
        print(f"[deid.{entry['project']}] {entry['pseudonym']}: Patient ID {patient.get('patient_id', '?')}"
              f"{' (issuer ' + patient['issuer'] + ')' if patient.get('issuer') else ''}, "
              f"name {patient.get('patient_name', '?')}")
        for study in entry["studies"]:
            print(f"    copy {study['copy']} <- study {study['study_uid']}"
                  f"{' accession ' + study['accession_number'] if study.get('accession_number') else ''}")
    return 0


def cmd_token_create(args) -> int:
    from viewer.tokens import TokenError, create

    try:
        with _index_made(_config(args)) as (index, _):
            token = create(index, args.name, args.scope, args.days)
            _cli_audit(index, "token_create", f"token:{args.name}: scope {args.scope}")
    except (TokenError, RuntimeError, OSError) as exc:
        print(f"m3dicom: {exc}", file=sys.stderr)
        return 1
    print(token)                  # alone on stdout (`TOKEN=$(m3dicom token create ...)`); shown this once
    print(f"token {args.name} ({args.scope}{f', {args.days:g} days' if args.days else ''}): send it as "
          "'Authorization: Bearer TOKEN'; it is shown only now", file=sys.stderr)
    return 0


def cmd_token_list(args) -> int:
    import time

    from viewer.tokens import listed

    def day(t):
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"

    with _index_of(args) as index:
        for t in listed(index):
            now = time.time()
            state = ("revoked" if t["revoked_at"] else "expired" if t["expires_at"] and t["expires_at"] <= now
                     else "live")
            print(f"{t['name']} {t['scope']} {state} created {day(t['created_at'])} expires {day(t['expires_at'])} "
                  f"last used {day(t['last_used'])}")
    return 0


def cmd_token_revoke(args) -> int:
    from viewer.tokens import revoke

    with _index_of(args) as index:
        if not revoke(index, args.name):
            print(f"m3dicom: no live token {args.name!r}", file=sys.stderr)
            return 1
        _cli_audit(index, "token_revoke", f"token:{args.name}: revoked")
    print(f"token {args.name} revoked: it opens nothing from its next request on")
    return 0


def _client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="peer address (default: dicom.host)")
    p.add_argument("--port", type=int, help="peer port (default: dicom.port, or dicom.plain_port with --no-tls)")
    p.add_argument("--called-ae", help="the peer's AE title (default: node.ae_title)")
    p.add_argument("--calling-ae", help="our AE title (default: client.ae_title)")
    p.add_argument("--no-tls", action="store_true", help="plain DICOM instead of DICOM TLS")
    p.add_argument("--cert", help="client certificate (default: client.certificate)")
    p.add_argument("--key", help="client private key (default: client.private_key)")
    p.add_argument("--ca", help="CA certificates that the peer's certificate must chain to")
    p.add_argument("--no-hostname-check", action="store_true",
                   help="accept a peer certificate that does not name the host")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="m3dicom", description="DICOM network node with cloud offload")
    top.add_argument("--version", action="version", version=f"m3dicom {__version__}")
    sub = top.add_subparsers(dest="command", required=True)

    def with_config(p):
        p.add_argument("--config", type=Path, help="TOML configuration file (default: built-in "
                       "defaults, paths relative to the current directory)")
        return p

    p = with_config(sub.add_parser("serve", help="run the node"))
    p.set_defaults(func=cmd_serve)

    certs = sub.add_parser("certs", help="development certificates").add_subparsers(dest="certs", required=True)
    p = certs.add_parser("init", help="write a development CA, server and client certificates")
    p.add_argument("--dir", default="certs", help="directory to write into (default: certs)")
    p.add_argument("--host", action="append", help="extra server host name or address (repeatable)")
    p.add_argument("--force", action="store_true", help="replace existing files")
    p.set_defaults(func=cmd_certs_init)
    p = certs.add_parser("issue-client", help="issue another client certificate from the CA")
    p.add_argument("name")
    p.add_argument("--dir", default="certs")
    p.add_argument("--force", action="store_true", help="replace existing files")
    p.set_defaults(func=cmd_certs_issue_client)

    p = with_config(sub.add_parser("status", help="what the node holds, and where its offload stands"))
    p.add_argument("--conflicts", action="store_true", help="list the instances that disagreed with the index "
                   "(patient values included: for the operator's terminal)")
    p.set_defaults(func=cmd_status)

    keys = sub.add_parser("keys", help="key-encryption keys").add_subparsers(dest="keys", required=True)
    p = with_config(keys.add_parser("rotate", help="new key-encryption key; re-wrap every data key "
                                    "(local blobs and S3 objects) without re-encrypting data"))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_keys_rotate)

    plugin = sub.add_parser("plugin", help="analysis plug-ins").add_subparsers(dest="plugin", required=True)
    p = with_config(plugin.add_parser("list", help="the installed plug-ins and their parameters"))
    p.add_argument("--json", action="store_true", help="as JSON (the schema the viewer's forms use)")
    p.set_defaults(func=cmd_plugin_list)
    p = with_config(plugin.add_parser("run", help="run a plug-in on DICOM files, without a node"))
    p.add_argument("name")
    p.add_argument("paths", nargs="+", type=Path, metavar="FILES|DIRS")
    p.add_argument("--param", action="append", metavar="NAME=VALUE", help="a plug-in parameter (repeatable)")
    p.add_argument("--out", required=True, help="folder for the results")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_plugin_run)

    p = with_config(sub.add_parser("worker", help="a Dask worker for an external cluster (router.scheduler)"))
    p.add_argument("--scheduler", required=True, help="the scheduler's address, tcp://host:8786")
    p.add_argument("--gpus", type=int, help="GPUs offered (resource GPU=N); default: the CUDA devices found; 0: jobs "
                   "here run with NumPy, even where a GPU is")
    p.add_argument("--nworkers", type=int, default=1, help="worker processes (one thread each)")
    p.set_defaults(func=cmd_worker)

    jobs = sub.add_parser("jobs", help="analysis jobs").add_subparsers(dest="jobs", required=True)
    p = with_config(jobs.add_parser("list", help="recent jobs, newest first"))
    p.add_argument("--study", help="only this Study Instance UID")
    p.add_argument("--state", action="append", choices=("queued", "running", "succeeded", "failed", "cancelled"))
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=cmd_jobs_list)
    p = with_config(jobs.add_parser("run", help="queue a plug-in on a stored study"))
    p.add_argument("plugin")
    p.add_argument("--study", required=True, help="Study Instance UID")
    p.add_argument("--series", action="append", help="only this series (repeatable); default: all it takes")
    p.add_argument("--param", action="append", metavar="NAME=VALUE")
    p.set_defaults(func=cmd_jobs_run)
    p = with_config(jobs.add_parser("cancel", help="cancel a queued or running job"))
    p.add_argument("id")
    p.set_defaults(func=cmd_jobs_cancel)

    p = with_config(sub.add_parser("viewer", help="run the web viewer alone (m3dicom serve runs it too)"))
    p.set_defaults(func=cmd_viewer)

    user = sub.add_parser("user", help="people who use the viewer").add_subparsers(dest="user", required=True)
    p = with_config(user.add_parser("add", help="add a user (password prompted, or one line on stdin)"))
    p.add_argument("name")
    p.add_argument("--role", choices=("reader", "clinician", "admin"),
                   help="reader: reads the studies of one referring physician (--referring); clinician: reads "
                        "all, runs analyses, shares, uploads; admin: also the admin page (default: clinician; "
                        "with --replace: the user's role as it is)")
    p.add_argument("--referring", metavar="'FAMILY^GIVEN'",
                   help="a reader's studies: those whose Referring Physician's Name matches this (wildcards * ?)")
    p.add_argument("--replace", action="store_true", help="set a new password for an existing user (and a new "
                   "role with --role); enables a disabled user")
    p.set_defaults(func=cmd_user_add)
    p = with_config(user.add_parser("disable", help="a user can no longer log in; their sessions end at once"))
    p.add_argument("name")
    p.set_defaults(func=cmd_user_disable)
    p = with_config(user.add_parser("enable", help="a disabled user can log in again"))
    p.add_argument("name")
    p.set_defaults(func=cmd_user_enable)
    p = with_config(user.add_parser("list", help="the users"))
    p.set_defaults(func=cmd_user_list)

    token = sub.add_parser("token", help="API tokens for DICOMweb clients").add_subparsers(dest="token",
                                                                                          required=True)
    p = with_config(token.add_parser("create", help="a new token, printed alone on stdout (shown once)"))
    p.add_argument("name")
    p.add_argument("--scope", choices=("read", "write"), default="read",
                   help="read: QIDO-RS and WADO-RS; write: STOW-RS too (default: read)")
    p.add_argument("--days", type=float, help="lifetime in days (default: until revoked)")
    p.set_defaults(func=cmd_token_create)
    p = with_config(token.add_parser("list", help="the tokens (never the tokens themselves)"))
    p.set_defaults(func=cmd_token_list)
    p = with_config(token.add_parser("revoke", help="a token opens nothing from its next request on"))
    p.add_argument("name")
    p.set_defaults(func=cmd_token_revoke)

    deid = sub.add_parser("deid", help="de-identified copies for research ([deid.NAME] profiles)").add_subparsers(
        dest="deid", required=True)
    p = with_config(deid.add_parser("export", help="send a de-identified copy of a study "
                                    "(`m3dicom deid STUDY_UID --to NAME` is short for it)"))
    p.add_argument("study", help="Study Instance UID")
    p.add_argument("--to", required=True, help="a [remote.NAME] node, or s3://bucket/prefix/")
    p.add_argument("--profile", help="the [deid.NAME] profile; default: the only one")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_deid_export)
    p = with_config(deid.add_parser("secret", help="make (or --rotate) a profile's secret"))
    p.add_argument("profile", nargs="?", help="the [deid.NAME] profile; default: the only one")
    p.add_argument("--rotate", action="store_true", help="replace it: new pseudonyms and UIDs from now on")
    p.set_defaults(func=cmd_deid_secret)
    p = with_config(deid.add_parser("list", help="recent exports, newest first"))
    p.add_argument("--study", help="only this Study Instance UID")
    p.add_argument("--limit", type=_positive, default=50)
    p.set_defaults(func=cmd_deid_list)
    p = with_config(deid.add_parser("lookup", help="who a pseudonym (or a copy's Study UID) is; audited"))
    p.add_argument("pseudonym", help="a pseudonym, a copy's Study Instance UID, or with --patient-id an original "
                   "Patient ID")
    p.add_argument("--patient-id", action="store_true", help="the value is an original Patient ID: its copies")
    p.add_argument("--issuer", help="with --patient-id: the Issuer of Patient ID, if the studies carry one")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_deid_lookup)

    p = with_config(sub.add_parser("echo", help="C-ECHO a DICOM node (TLS by default)"))
    _client_options(p)
    p.set_defaults(func=cmd_echo)

    p = with_config(sub.add_parser("send", help="C-STORE files or directories (TLS by default)"))
    _client_options(p)
    p.add_argument("paths", nargs="+", type=Path, metavar="FILES|DIRS")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_send)
    return top


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["deid"] and argv[1:2] and argv[1][:1].isdigit():   # `m3dicom deid STUDY_UID --to NAME`
        argv.insert(1, "export")
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:      # `m3dicom jobs list | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # nothing left to flush into
        return 0
    except ConfigError as exc:
        print(f"m3dicom: configuration error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a clear one-line refusal for anticipated errors
        from archive.crypto import IntegrityError
        from certs.pki import PKIError
        from scp.scu import SendError

        # RuntimeError: our clear refusals (TLS set-up, missing index, KMS unreachable)
        if isinstance(exc, (PKIError, SendError, FileNotFoundError, IntegrityError, RuntimeError)):
            print(f"m3dicom: {exc}", file=sys.stderr)
            return 1
        said = _index_error(exc)
        if said:
            print(f"m3dicom: {said}", file=sys.stderr)
            return 1
        raise


def _index_error(exc: Exception) -> str | None:
    """A database that cannot be reached or read (wrong password, no pass file, server down, a schema
    from a newer m3dicom) as one line, or None for anything else."""
    from alembic.util.exc import CommandError
    from sqlalchemy.exc import DBAPIError

    from archive.db import brief

    if isinstance(exc, CommandError) and "Can't locate revision" in str(exc):
        return (f"the index was made by a newer version of m3dicom ({exc}): run this node's newer version, or "
                "restore the index of this version")
    if isinstance(exc, DBAPIError):
        said = brief(exc)
        hint = ("; the password comes from PGPASSWORD, the pass file PGPASSFILE names, or a service file"
                if "password" in said or "authentication" in said else "")
        return f"cannot use the index: {said} (index.url{hint})"
    return None


if __name__ == "__main__":
    sys.exit(main())
