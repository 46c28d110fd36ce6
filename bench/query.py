"""Query benchmark: C-FIND latency through a real TLS association as the index grows.

The index is filled with synthetic patients / studies / series / instances through the
index's write API (no network, no blobs: the query path never reads them), then the node
is started on it and answers 200 queries of each kind over mutual TLS, one association
per kind: study level by patient-name prefix wildcard, by PatientID, by a one-month
StudyDate range, and series level within a study. Two clients ask: dcmtk's findscu (C++,
as a PACS would; each query timed from its log's "Sending Find Request" to "Received Final
Find Response", microsecond time stamps) and pynetdicom (Python: decoding each response
costs it ~0.7 ms of its own CPU, which shows on queries with many matches). Orthanc
(Debian, DICOM TLS) gets the same 10k instances by C-STORE (storescu) and the same
queries, for comparison. Prints p50 / p95 in ms as a Markdown table. Not a test: nothing
is asserted.

`--postgresql` starts a private PostgreSQL cluster for the run (tests/pgcluster.py: initdb in /tmp,
loopback only, stopped at the end) tuned as a small production server would be (16 GB of memory):
shared_buffers 1GB, work_mem 16MB, effective_cache_size 8GB, random_page_cost 1.1 (SSD), and max_wal_size
4GB for the fill. On PostgreSQL the index is filled by COPY (`copy_fill`: the same rows as the write API
makes, ~10x faster; `--fill api` for the write API; `--compare-fills` fills both ways and checks that the
same queries get the same answers), then VACUUM ANALYZE'd, as autovacuum soon would; the database's size
is printed with the fill's time.

`--index-url postgresql://USER@HOST:PORT/DB` puts the node's index on that PostgreSQL server instead:
for each size the bench creates a database of its own there (m3qbench_SIZE, dropped at the end: the
role needs CREATEDB), fills it, and starts the node on it; the password comes from libpq's environment
(PGPASSWORD, PGPASSFILE). `--explain` prints each kind's query plan (EXPLAIN ANALYZE on PostgreSQL,
EXPLAIN QUERY PLAN on SQLite) for one of its queries once the index is filled, and on PostgreSQL the
generic plan too (the one a statement psycopg has prepared, after five runs, may get).

    .venv/bin/python bench/query.py [--sizes 10000,100000,1000000] [--queries 200] [--no-orthanc]
                                    [--postgresql | --index-url URL] [--fill api|copy] [--compare-fills]
                                    [--explain]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND
import sqlalchemy as sa
from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from archive.dicomfile import InstanceHeader  # noqa: E402
from archive.index import Index  # noqa: E402
from archive.matching import name_key, time_key  # noqa: E402
from archive.query import STUDY_ROOT, Query  # noqa: E402
from bench.ingest import ENV, ROOT, free_port, wait_port  # noqa: E402
from scp.tls import client_context, no_delay  # noqa: E402

SURNAMES = ["SMITH", "JONES", "TAYLOR", "BROWN", "WILLIAMS", "WILSON", "JOHNSON", "DAVIES", "ROBINSON",
            "WRIGHT", "THOMPSON", "EVANS", "WALKER", "WHITE", "ROBERTS", "GREEN", "HALL", "WOOD", "JACKSON",
            "CLARKE", "MARTIN", "MULLER", "SCHMIDT", "DUBOIS", "ROSSI", "GARCIA", "NOVAK", "KOWALSKI"]
FIRST = ["ANNA", "JOHN", "MARIA", "PETER", "EVA", "PAUL", "SARA", "LUCAS", "EMMA", "NOAH"]
MODALITIES = ["CT", "MR", "CR", "US", "MG", "PT"]
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
INSERT_INSTANCE = text(
    "INSERT INTO instances (sop_instance_uid, series_pk, sop_class_uid, instance_number, transfer_syntax, size, "
    "sha256, blob_id, calling_ae, received_at) VALUES (:uid, :series_pk, :sop_class_uid, :number, "
    "'1.2.840.10008.1.2.1', 40000, '" + "0" * 64 + "', :blob_id, 'BENCH', :now)")


@dataclass
class Synthetic:
    """What the queries ask for, drawn from what was filled."""
    names: list[str]
    patient_ids: list[str]
    study_uids: list[str]


def synthetic(size: int, seed: int = 7):
    """(patient, study, series, instances) tuples: ~65 instances per study over ten years. The same
    rows each time, UIDs too (`instance_uid`, `blob_id`): both fills make the same index."""
    rng, uids = random.Random(seed), random.Random(seed + 1)

    def uid() -> str:
        return f"2.25.{uids.getrandbits(122)}"     # as pydicom's generate_uid, from a seeded generator
    start = date(2015, 1, 1)
    made, patient_no = 0, 0
    while made < size:
        patient_no += 1
        pid = f"PAT{patient_no:07d}"
        name = f"{rng.choice(SURNAMES)}{rng.randint(1, 400)}^{rng.choice(FIRST)}"
        for _ in range(rng.randint(1, 3)):
            study = {"uid": uid(), "date": (start + timedelta(days=rng.randint(0, 3650))).strftime("%Y%m%d"),
                     "time": f"{rng.randint(7, 19):02d}{rng.randint(0, 59):02d}00",
                     "accession": f"ACC{rng.randint(0, 10**8):08d}", "description": "synthetic"}
            for number in range(1, rng.randint(1, 4) + 1):
                count = min(rng.randint(5, 40), size - made)
                if count <= 0:
                    return
                yield (pid, name), study, (uid(), number, rng.choice(MODALITIES)), count
                made += count


def instance_uid(series_uid: str, number: int) -> str:
    return f"{series_uid}.{number}"


def blob_id(sop_instance_uid: str) -> str:
    """32 hex digits, as random as the node's own, the same for the same instance."""
    return hashlib.md5(sop_instance_uid.encode()).hexdigest()


def fill(index: Index, size: int) -> Synthetic:
    names, ids, studies = set(), [], []
    batch, now = [], time.time()

    def flush():
        with index.write() as conn:
            for (pid, name), study, (series_uid, number, modality), count in batch:
                attrs = {"PatientID": pid, "PatientName": name, "PatientBirthDate": None, "PatientSex": "O",
                         "StudyDate": study["date"], "StudyTime": study["time"],
                         "AccessionNumber": study["accession"], "StudyDescription": study["description"],
                         "ReferringPhysicianName": None, "StudyID": "1", "Modality": modality,
                         "SeriesDescription": None, "BodyPartExamined": None, "SpecificCharacterSet": None,
                         "SeriesNumber": number, "InstanceNumber": None}
                header = InstanceHeader(CT_IMAGE, "", study["uid"], series_uid, "1.2.840.10008.1.2.1", 0, attrs)
                series_pk = Index.upsert_hierarchy(conn, header, now)
                uids = [instance_uid(series_uid, i + 1) for i in range(count)]
                conn.execute(INSERT_INSTANCE, [
                    {"uid": uid, "series_pk": series_pk, "sop_class_uid": CT_IMAGE, "number": i + 1,
                     "blob_id": blob_id(uid), "now": now} for i, uid in enumerate(uids)])
        batch.clear()

    rows = 0
    for entry in synthetic(size):
        batch.append(entry)
        (pid, name), study = entry[0], entry[1]
        names.add(name.split("^")[0])
        if not ids or ids[-1] != pid:
            ids.append(pid)
        if not studies or studies[-1] != study["uid"]:
            studies.append(study["uid"])
        rows += entry[3]
        if len(batch) >= 2000:
            flush()
    flush()
    return Synthetic(sorted(names), ids, studies)


def copy_fill(url: str, size: int) -> Synthetic:
    """The rows `fill` writes, COPY'd (psycopg) into the archive's tables on PostgreSQL, as its migrations
    made them (`Index` runs them), with the pks the write API would have given them: ~10x faster.

    Patients, studies and series are drawn first (a few hundred thousand rows at 10M instances), then
    the instances are streamed. The rows are consistent by construction: the foreign keys' triggers are
    off while copying (`session_replication_role = replica`, as pg_restore --disable-triggers does); the
    unique indexes still check. The pk sequences are set past the rows afterwards."""
    import psycopg

    Index(url).close()                      # the archive's schema, by its migrations
    names, ids, studies = set(), [], []
    patients, study_rows, series_rows, entries = [], [], [], []
    now = time.time()
    for entry in synthetic(size):
        (pid, name), study, (series_uid, number, modality), count = entry
        names.add(name.split("^")[0])
        if not ids or ids[-1] != pid:
            ids.append(pid)
            patients.append((len(patients) + 1, pid, name, name_key(name), None, "O"))
        if not studies or studies[-1] != study["uid"]:
            studies.append(study["uid"])
            study_rows.append((len(study_rows) + 1, study["uid"], len(patients), study["date"], study["time"],
                               time_key(study["time"]), study["accession"], study["description"], None, None,
                               "1", None, now))
        series_rows.append((len(series_rows) + 1, series_uid, len(study_rows), modality, number, None, None))
        entries.append((series_uid, len(series_rows), count))
    tables = (("patients", "pk, patient_id, patient_name, patient_name_key, birth_date, sex", patients),
              ("studies", "pk, study_uid, patient_pk, study_date, study_time, study_time_key, accession_number, "
                          "study_description, referring_physician, referring_physician_key, study_id, "
                          "character_set, updated_at", study_rows),
              ("series", "pk, series_uid, study_pk, modality, series_number, series_description, body_part",
               series_rows))
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        cur.execute("SET session_replication_role = replica")
        for table, columns, rows in tables:
            with cur.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        pk = 0
        with cur.copy("COPY instances (pk, sop_instance_uid, series_pk, sop_class_uid, instance_number, "
                      "transfer_syntax, size, sha256, blob_id, calling_ae, received_at) FROM STDIN") as copy:
            for series_uid, series_pk, count in entries:
                for number in range(1, count + 1):
                    uid = instance_uid(series_uid, number)
                    pk += 1
                    copy.write_row((pk, uid, series_pk, CT_IMAGE, number, "1.2.840.10008.1.2.1", 40000, "0" * 64,
                                    blob_id(uid), "BENCH", now))
        for table in ("patients", "studies", "series", "instances"):
            cur.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'pk'), (SELECT MAX(pk) FROM {table}))")
    return Synthetic(sorted(names), ids, studies)


def settle(url: str) -> int:
    """What autovacuum would soon do after a fill (VACUUM: hint bits and the visibility map for
    index-only scans; ANALYZE: statistics for the planner); the database's size in bytes."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
        return conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]


def answers(index: Index, asked: dict[str, list[Dataset]]) -> dict[str, list[list[tuple]]]:
    """Every query's rows as the C-FIND SCP reads them."""
    with index.reader() as conn:
        return {kind: [Query(STUDY_ROOT, identifier).rows(conn, None, None) for identifier in identifiers]
                for kind, identifiers in asked.items()}


def database_only(index: Index, asked: dict[str, list[Dataset]]) -> dict[str, tuple]:
    """Each kind's queries as the C-FIND SCP runs them (`Query._rows`), all on one reader connection, without
    the network or the encoding: p50 / p95 ms and mean matches. On PostgreSQL also what the plan cache did
    with the statements psycopg prepared (after five runs): (generic plans, custom plans) per kind."""
    results = {}
    with index.reader() as conn:
        for kind, identifiers in asked.items():
            times, matches = [], []
            for identifier in identifiers:
                t0 = time.perf_counter()
                rows = Query(STUDY_ROOT, identifier).rows(conn, None, None)
                times.append((time.perf_counter() - t0) * 1000)
                matches.append(len(rows))
            times.sort()
            results[kind] = (statistics.median(times), times[int(len(times) * 0.95) - 1], statistics.mean(matches))
        if not index.sqlite:
            plans = conn.exec_driver_sql("SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements")
            by_sql = {sql: (generic, custom) for sql, generic, custom in plans}
            for kind, identifiers in asked.items():
                sql = Query(STUDY_ROOT, identifiers[0]).sql_for(conn.dialect)
                plan = [v for k, v in by_sql.items() if _same_shape(k, sql)]
                results[kind] += (plan[0] if plan else "not prepared",)
    return results


def _same_shape(prepared: str, sql: str) -> bool:
    """A statement as PostgreSQL holds it ($1) is this SQL (:p0)."""
    return re.sub(r"\$\d+", "?", prepared) == re.sub(r":p\d+\b", "?", sql)


def queries(data: Synthetic, count: int, seed: int = 11) -> dict[str, list[Dataset]]:
    rng = random.Random(seed)

    def study_level(**keys) -> Dataset:
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        for k in ("PatientName", "PatientID", "StudyDate", "StudyInstanceUID", "AccessionNumber",
                  "ModalitiesInStudy", "NumberOfStudyRelatedInstances"):
            setattr(ds, k, "")
        for k, v in keys.items():
            setattr(ds, k, v)
        return ds

    def series_level(study: str) -> Dataset:
        ds = Dataset()
        ds.QueryRetrieveLevel = "SERIES"
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = ds.Modality = ds.SeriesNumber = ds.NumberOfSeriesRelatedInstances = ""
        return ds

    def month() -> str:
        first = date(2015, 1, 1) + timedelta(days=rng.randint(0, 3600))
        first = first.replace(day=1)
        last = (first + timedelta(days=32)).replace(day=1) - timedelta(days=1)
        return f"{first:%Y%m%d}-{last:%Y%m%d}"

    return {
        "name prefix": [study_level(PatientName=rng.choice(data.names) + "*") for _ in range(count)],
        "PatientID": [study_level(PatientID=rng.choice(data.patient_ids)) for _ in range(count)],
        "one month": [study_level(StudyDate=month()) for _ in range(count)],
        "series in study": [series_level(rng.choice(data.study_uids)) for _ in range(count)],
    }


def run_queries(port: int, aec: str, pki: Path, asked: dict[str, list[Dataset]]) -> dict[str, tuple]:
    """One association per kind of query; each query timed from request to final response."""
    pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False  # the client's own logging would dominate
    ae = AE(ae_title="QBENCH")
    ae.add_requested_context(FIND)
    tls = client_context(pki / "ca.pem", pki / "client.pem", pki / "client.key")
    results = {}
    for kind, identifiers in asked.items():
        assoc = ae.associate("127.0.0.1", port, ae_title=aec, tls_args=(tls, "localhost"),
                             evt_handlers=[(evt.EVT_CONN_OPEN, no_delay)])
        if not assoc.is_established:
            raise RuntimeError(f"cannot associate with {aec} on {port}")
        times, matches = [], []
        try:
            for identifier in identifiers:
                t0 = time.perf_counter()
                statuses = [(status.get("Status"), ds) for status, ds in assoc.send_c_find(identifier, FIND)]
                times.append((time.perf_counter() - t0) * 1000)
                if not statuses or statuses[-1][0] != 0:
                    raise RuntimeError(f"{aec}: {kind} query ended with {statuses[-1:]}\n{identifier}")
                matches.append(sum(1 for status, ds in statuses if status in (0xFF00, 0xFF01)))
        finally:
            if assoc.is_established:
                assoc.release()
        times.sort()
        results[kind] = (statistics.median(times), times[int(len(times) * 0.95) - 1], statistics.mean(matches))
    return results


FINDSCU_LOG = """log4cplus.rootLogger = INFO, console
log4cplus.appender.console = log4cplus::ConsoleAppender
log4cplus.appender.console.layout = log4cplus::PatternLayout
log4cplus.appender.console.layout.ConversionPattern = %D{%H:%M:%S.%Q} %m%n
"""


def run_findscu(port: int, aec: str, pki: Path, asked: dict[str, list[Dataset]], work: Path) -> dict[str, tuple]:
    """The same queries from dcmtk findscu: all of a kind as query files on one association."""
    config = work / "findscu-log.cfg"
    config.write_text(FINDSCU_LOG)
    results = {}
    for kind, identifiers in asked.items():
        folder = Path(tempfile.mkdtemp(dir=work))
        files = []
        for n, identifier in enumerate(identifiers):
            files.append(folder / f"{n:04d}.dcm")
            identifier.save_as(files[-1], implicit_vr=False, little_endian=True)
        log = subprocess.run(["findscu", "-lc", str(config), "-S", "-sr", "+tls", f"{pki}/client.key",
                              f"{pki}/client.pem", "+cf", f"{pki}/ca.pem", "-aec", aec, "127.0.0.1", str(port),
                              *map(str, files)], env=ENV, capture_output=True, timeout=600).stdout
        shutil.rmtree(folder)
        times, matches, sent = [], [], None
        for line in log.decode("utf-8", "replace").splitlines():
            stamp, _, message = line.partition(" ")
            if message.startswith("Sending Find Request"):
                sent, matches = _ms(stamp), matches + [0]
            elif message.startswith("Received Find Response") and "(Pending)" in message:
                matches[-1] += 1
            elif message.startswith("Received Final Find Response"):
                if "(Success)" not in message:
                    raise RuntimeError(f"{aec}: {kind} query ended with {message}")
                times.append((_ms(stamp) - sent) % 86_400_000)
        if len(times) != len(identifiers):
            raise RuntimeError(f"{aec}: findscu answered {len(times)} of {len(identifiers)} {kind} queries")
        times.sort()
        results[kind] = (statistics.median(times), times[int(len(times) * 0.95) - 1], statistics.mean(matches))
    return results


def _ms(stamp: str) -> float:
    """'HH:MM:SS.mmm.uuu' (log4cplus %S.%Q) as milliseconds since midnight."""
    hours, minutes, rest = stamp.split(":")
    seconds, millis, micros = rest.split(".")
    return ((int(hours) * 60 + int(minutes)) * 60 + int(seconds)) * 1000 + int(millis) + int(micros) / 1000


def explain(index: Index, asked: dict[str, list[Dataset]]) -> None:
    """Each kind's plan for its first query, with its values (PostgreSQL: as run, with timings; then the
    generic plan, which a statement psycopg has prepared may be given after its fifth run)."""
    with index.reader() as conn:
        for kind, identifiers in asked.items():
            query = Query(STUDY_ROOT, identifiers[0])
            sql = query.sql_for(conn.dialect)
            if index.sqlite:
                plan = [row[3] for row in conn.execute(text("EXPLAIN QUERY PLAN " + sql), query.params)]
            else:
                plan = [row[0] for row in conn.execute(text("EXPLAIN (ANALYZE, BUFFERS) " + sql), query.params)]
            print(f"\n{kind} ({', '.join(f'{k}={v!r}' for k, v in query.params.items())}):\n    " + "\n    ".join(plan))
            if not index.sqlite:
                print("  generic plan:\n    " + "\n    ".join(generic_plan(conn, query)))


def generic_plan(conn, query: Query) -> list[str]:
    """The plan PostgreSQL gives the query prepared, for any values (`plan_cache_mode = force_generic_plan`),
    run with the query's values: PREPARE, then EXPLAIN EXECUTE (an EXPLAIN prepared by the driver is planned
    with its values)."""
    from psycopg import sql as pgsql

    statement = query.sql_for(conn.dialect)
    names = list(dict.fromkeys(re.findall(r":(p\d+)\b", statement)))      # those this dialect's SQL uses
    statement = re.sub(r":(p\d+)\b", lambda m: f"${names.index(m.group(1)) + 1}", statement)
    raw = conn.connection.dbapi_connection
    with raw.cursor() as cursor:
        cursor.execute("PREPARE m3qbench_generic AS " + statement.replace("%", "%%"))
        try:
            cursor.execute("SET plan_cache_mode = force_generic_plan")
            cursor.execute(pgsql.SQL("EXPLAIN (ANALYZE, BUFFERS) EXECUTE m3qbench_generic ({})").format(
                pgsql.SQL(", ").join(pgsql.Literal(query.params[n]) for n in names)))
            return [row[0] for row in cursor.fetchall()]
        finally:
            cursor.execute("RESET plan_cache_mode")
            cursor.execute("DEALLOCATE m3qbench_generic")


# the private cluster's settings (--postgresql): a small production server's (16 GB of memory); max_wal_size
# so that a fill of millions of rows is not one checkpoint after another
TUNED = (("shared_buffers", "1GB"), ("work_mem", "16MB"), ("effective_cache_size", "8GB"),
         ("random_page_cost", "1.1"), ("max_wal_size", "4GB"))


class Databases:
    """A database of its own for each size on the PostgreSQL server of `url` (created, then dropped)."""

    def __init__(self, url: str):
        self.url = sa.engine.make_url(url).set(drivername="postgresql+psycopg")
        self.admin = sa.create_engine(self.url, isolation_level="AUTOCOMMIT")

    def create(self, name: str) -> str:
        with self.admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        return self.url.set(drivername="postgresql", database=name).render_as_string(hide_password=False)

    def drop(self, name: str) -> None:
        with self.admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def node(work: Path, pki: Path, data_dir: Path, index_url: str = "",
         viewer_port: int = 0) -> tuple[subprocess.Popen, int]:
    port = free_port()
    config = work / "m3.toml"
    config.write_text(f'[node]\nae_title = "M3DICOM"\ndata_dir = "{data_dir}"\n'
                      + (f'[index]\nurl = "{index_url}"\n' if index_url else "") +
                      f'[dicom]\nport = {port}\ncertificate = "{pki}/server.pem"\nprivate_key = "{pki}/server.key"\n'
                      f'ca_certificates = "{pki}/ca.pem"\n[query]\nmax_results = 5000\n[log]\nlevel = "WARNING"\n'
                      + (f"[viewer]\nenabled = true\nport = {viewer_port}\n" if viewer_port
                         else "[viewer]\nenabled = false\n"))
    proc = subprocess.Popen([sys.executable, "-m", "node.cli", "serve", "--config", str(config)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=open(work / "m3.log", "ab"),
                            env={**os.environ, "M3DICOM_ADMIN_PASSWORD": secrets.token_urlsafe(16)})
    t0 = time.perf_counter()
    wait_port(port, timeout=600)            # at start the node reads every blob id of the index (recover)
    print(f"the node listened after {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return proc, port


def orthanc_filled(work: Path, pki: Path, size: int) -> tuple[subprocess.Popen, int, Synthetic]:
    """Orthanc with the synthetic instances of `size`, sent by storescu over TLS."""
    import pydicom

    template = pydicom.dcmread(Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm")
    files = work / "orthanc-files"
    files.mkdir()
    names, ids, studies, n = set(), [], [], 0
    for (pid, name), study, (series_uid, number, modality), count in synthetic(size):
        names.add(name.split("^")[0])
        if not ids or ids[-1] != pid:
            ids.append(pid)
        if not studies or studies[-1] != study["uid"]:
            studies.append(study["uid"])
        for i in range(count):
            ds = template.copy()
            ds.PatientID, ds.PatientName, ds.StudyInstanceUID = pid, name, study["uid"]
            ds.StudyDate, ds.StudyTime, ds.AccessionNumber = study["date"], study["time"], study["accession"]
            ds.SeriesInstanceUID, ds.SeriesNumber, ds.Modality, ds.InstanceNumber = series_uid, number, modality, i + 1
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = instance_uid(series_uid, i + 1)
            ds.save_as(files / f"{n:07d}.dcm", enforce_file_format=True)
            n += 1
    port = free_port()
    store = work / "orthanc-db"
    config = work / "orthanc.json"
    config.write_text(json.dumps({
        "Name": "qbench", "StorageDirectory": str(store), "IndexDirectory": str(store), "DicomAet": "ORTHANC",
        "DicomPort": port, "HttpPort": free_port(), "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True, "DicomAlwaysAllowFind": True,
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": f"{pki}/server.pem", "DicomTlsPrivateKey": f"{pki}/server.key",
        "DicomTlsTrustedCertificates": f"{pki}/ca.pem", "DicomTlsRemoteCertificateRequired": True,
        "LimitFindResults": 0, "LimitFindInstances": 0, "Plugins": [], "LogLevel": "default"}))
    proc = subprocess.Popen(["Orthanc", str(config)], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=open(work / "orthanc.log", "ab"))
    wait_port(port)
    subprocess.run(["storescu", "+tls", f"{pki}/client.key", f"{pki}/client.pem", "+cf", f"{pki}/ca.pem",
                    "-aec", "ORTHANC", "+sd", "127.0.0.1", str(port), str(files)], env=ENV, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shutil.rmtree(files)
    return proc, port, Synthetic(sorted(names), ids, studies)


QIDO_KEYS = {"PatientName": "PatientName", "PatientID": "PatientID", "StudyDate": "StudyDate"}


def run_qido(base: str, token: str, pki: Path, asked: dict[str, list[Dataset]]) -> dict[str, tuple]:
    """The same queries over QIDO-RS (HTTPS, a read token, one kept-alive connection, gzip): each timed from
    request to the whole JSON answer parsed."""
    import requests

    session = requests.Session()
    session.trust_env, session.verify = False, str(pki / "ca.pem")
    session.headers["Authorization"] = f"Bearer {token}"
    results = {}
    for kind, identifiers in asked.items():
        times, matches = [], []
        for identifier in identifiers:
            if identifier.QueryRetrieveLevel == "SERIES":
                url, params = f"{base}/studies/{identifier.StudyInstanceUID}/series", {}
            else:
                url = f"{base}/studies"
                params = {key: str(identifier.get(key)) for key in QIDO_KEYS if identifier.get(key)}
                params["includefield"] = "ModalitiesInStudy,NumberOfStudyRelatedInstances,AccessionNumber"
            t0 = time.perf_counter()
            answer = session.get(url, params=params)
            found = answer.json() if answer.status_code == 200 else []
            times.append((time.perf_counter() - t0) * 1000)
            if answer.status_code not in (200, 204):
                raise RuntimeError(f"QIDO {kind}: {answer.status_code} {answer.text[:200]}")
            matches.append(len(found))
        times.sort()
        results[kind] = (statistics.median(times), times[int(len(times) * 0.95) - 1], statistics.mean(matches))
    return results


def measure(name: str, proc: subprocess.Popen, port: int, aec: str, pki: Path, data: Synthetic,
            count: int, work: Path, qido: tuple[str, str] | None = None) -> list[tuple[str, str, dict]]:
    """Run the queries against a started receiver from both clients (and QIDO-RS: (base URL, token)), then
    stop it."""
    try:
        asked = queries(data, count)
        rows = [(name, "findscu", run_findscu(port, aec, pki, asked, work)),
                (name, "pynetdicom", run_queries(port, aec, pki, asked))]
        if qido:
            rows.append((name, "QIDO-RS (requests)", run_qido(*qido, pki, asked)))
    finally:
        proc.terminate()
        proc.wait(20)
    print(rows, file=sys.stderr)
    return rows


def private_cluster():
    """A PostgreSQL cluster of the bench's own (tests/pgcluster.py), restarted with `TUNED`."""
    sys.path.insert(0, str(ROOT / "tests"))
    from pgcluster import Cluster

    cluster = Cluster().start()
    os.environ.update(cluster.env)          # the pass file, for this process and the node it starts
    cluster._run("pg_ctl", "-D", str(cluster.data), "-m", "fast", "-w", "stop")
    options = (f"-c listen_addresses=127.0.0.1 -c port={cluster.port} -c unix_socket_directories={cluster.base} "
               "-c max_connections=200 -c log_min_messages=warning " + " ".join(f"-c {k}={v}" for k, v in TUNED))
    cluster._run("pg_ctl", "-D", str(cluster.data), "-o", options, "-l", str(cluster.base / "server.log"), "-w",
                 "-t", "60", "start")
    return cluster


def compare_fills(databases: Databases, size: int, count: int) -> None:
    """`size` instances filled through the write API and by COPY: the same answers to the same queries."""
    results = []
    for way in ("api", "copy"):
        url = databases.create(f"m3qbench_{way}_{size}")
        t0 = time.perf_counter()
        if way == "api":
            index = Index(url)
            data = fill(index, size)
            index.close()
        else:
            data = copy_fill(url, size)
        settle(url)
        print(f"{way}: filled {size} instances in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        index = Index(url)
        results.append((data, answers(index, queries(data, count))))
        with index.reader() as conn:
            results[-1] += (tuple(conn.exec_driver_sql(          # every column but the fill's time
                f"SELECT COUNT(*), md5(string_agg((to_jsonb(t) - 'updated_at' - 'received_at')::text, ',' "
                f"ORDER BY pk)) FROM {table} t").one() for table in ("patients", "studies", "series", "instances")),)
        index.close()
        databases.drop(f"m3qbench_{way}_{size}")
    (api_data, api, api_counts), (copy_data, copy, copy_counts) = results
    rows = sum(len(r) for kind in api.values() for r in kind)
    same = api_data == copy_data and api == copy and api_counts == copy_counts
    print(f"{'same' if same else 'DIFFERENT'}: {sum(map(len, api.values()))} queries, {rows} matching rows; "
          f"(rows, md5) of patients, studies, series, instances: {api_counts} / {copy_counts}")
    if not same:
        raise SystemExit(1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--no-orthanc", action="store_true")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--index-url", default="", help="a PostgreSQL server for the index (see above)")
    where.add_argument("--postgresql", action="store_true", help="the index on a private PostgreSQL cluster")
    ap.add_argument("--fill", choices=("api", "copy"), help="how (default: copy on PostgreSQL, else api)")
    ap.add_argument("--compare-fills", action="store_true",
                    help="fill each size both ways, compare the answers (PostgreSQL), and stop")
    ap.add_argument("--explain", action="store_true", help="print each kind's query plan")
    ap.add_argument("--qido", action="store_true", help="the same queries over QIDO-RS too (the node's viewer on)")
    args = ap.parse_args(argv)
    cluster = private_cluster() if args.postgresql else None
    index_url = cluster.url() if cluster else args.index_url
    databases = Databases(index_url) if index_url else None
    if (args.fill == "copy" or args.compare_fills) and not databases:
        ap.error("--fill copy and --compare-fills need PostgreSQL (--postgresql or --index-url)")
    work = Path(tempfile.mkdtemp(prefix="m3qbench-"))
    rows = []
    try:
        if args.compare_fills:
            for size in map(int, args.sizes.split(",")):
                compare_fills(databases, size, args.queries)
            return 0
        pki = work / "pki"
        subprocess.run([sys.executable, "-m", "node.cli", "certs", "init", "--dir", str(pki)], cwd=ROOT,
                       check=True, capture_output=True)
        for size in map(int, args.sizes.split(",")):
            data_dir = work / f"m3-{size}"
            t0 = time.perf_counter()
            data_dir.mkdir(mode=0o700, parents=True)
            url = databases.create(f"m3qbench_{size}") if databases else ""
            if url and args.fill != "api":
                data = copy_fill(url, size)
            else:
                index = Index(url or data_dir / "index.sqlite3")
                data = fill(index, size)
                index.close()
            filled = time.perf_counter() - t0
            if url:
                size_on_disk = settle(url)
                print(f"filled {size} instances in {filled:.0f} s (VACUUM ANALYZE: "
                      f"{time.perf_counter() - t0 - filled:.0f} s); database size {size_on_disk / 2**20:,.0f} MiB",
                      file=sys.stderr)
            else:
                print(f"filled {size} instances in {filled:.0f} s", file=sys.stderr)
            index = Index(url or data_dir / "index.sqlite3")
            if args.explain:
                explain(index, queries(data, 1))
            for kind, result in database_only(index, queries(data, args.queries)).items():
                print(f"database only, {kind}: {result[0]:.1f} / {result[1]:.1f} ms ({result[2]:.0f})"
                      + (f"; (generic, custom) plans: {result[3]}" if len(result) > 3 else ""), file=sys.stderr)
            index.close()
            viewer_port = free_port() if args.qido else 0
            proc, port = node(work, pki, data_dir, url, viewer_port)
            qido = None
            if args.qido:
                wait_port(viewer_port, timeout=120)
                token = subprocess.run([sys.executable, "-m", "node.cli", "token", "create", "qbench", "--scope",
                                        "read", "--config", str(work / "m3.toml")], cwd=ROOT, check=True,
                                       capture_output=True, text=True).stdout.strip()
                qido = (f"https://127.0.0.1:{viewer_port}/dicomweb", token)
            engine = "PostgreSQL" if url else "SQLite"
            rows += measure(f"m3dicom ({engine}), {size:,} instances", proc, port, "M3DICOM", pki, data,
                            args.queries, work, qido)
            shutil.rmtree(data_dir)
            if databases:
                databases.drop(f"m3qbench_{size}")
        if not args.no_orthanc:
            size = 10000
            proc, port, data = orthanc_filled(work, pki, size)
            rows += measure(f"Orthanc, {size:,} instances", proc, port, "ORTHANC", pki, data, args.queries, work)
        kinds = list(rows[0][2])
        print("| index | client | " + " | ".join(f"{k}: p50 / p95 ms (matches)" for k in kinds) + " |")
        print("|---|---|" + "---|" * len(kinds))
        for name, client, results in sorted(rows, key=lambda row: row[1]):
            print(f"| {name} | {client} | " + " | ".join(
                f"{results[k][0]:.1f} / {results[k][1]:.1f} ({results[k][2]:.0f})" for k in kinds) + " |")
    finally:
        if cluster:
            cluster.stop()
        for log in work.glob("*.log"):
            shutil.copy(log, Path(tempfile.gettempdir()) / f"qbench-{log.name}")
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
