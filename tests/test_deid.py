"""De-identified export (issue 20) over the real path: a node, its router and the CAD, dcmtk's storescp and an S3
bucket (moto) as destinations, the command line; every output byte scanned for what identifies the patient."""
from __future__ import annotations

import dataclasses
import datetime
import json
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from gpu_workers.mammo import phantom
from helpers import free_port, wait_for

DCIODVFY = Path(sys.executable).parent / "dciodvfy"
SMALL = phantom.Options(rows=900, columns=720, spacing=0.1)
PHI = {   # identifying values put in every place the issue names: the copies must carry none of them
    "PatientName": "Zyxwarden^Philomena^Q", "PatientID": "PID-77-SECRET", "PatientBirthDate": "19581103",
    "AccessionNumber": "ACC99887766", "InstitutionName": "Saint Quillfeather Hospital",
    "ReferringPhysicianName": "Drumblewick^Oswin", "DeviceSerialNumber": "SN-4418-XQ", "StationName": "MAMMOROOM7",
    "OperatorsName": "Tallowmere^Ines",
}
STUDY_DATE = "20250314"


def dciodvfy_errors(path: Path) -> set[str]:
    out = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=60)
    return {line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")}


def hostile_mammogram(directory: Path, seed: int, study_date: str = STUDY_DATE, **extra) -> tuple[Path, dict]:
    """A phantom with clusters (the CAD reports them) and identifying values everywhere: top level, free text,
    a nested sequence, a private block, the file meta."""
    path, _ = phantom.write(directory, seed, dataclasses.replace(SMALL, clusters=2, isolated=2, density=0.3,
                                                                 view="CC"))
    ds = pydicom.dcmread(path)
    for keyword, value in PHI.items():
        setattr(ds, keyword, value)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = study_date
    ds.StudyDescription = f"Screening for {PHI['PatientName']} {PHI['PatientID']} on {study_date}"
    ds.ImageComments = f"seen by Drumblewick, accession {PHI['AccessionNumber']}"
    request = pydicom.Dataset()
    request.RequestedProcedureID, request.ScheduledProcedureStepID = "RP-SECRET-1", "SPS-SECRET-1"
    request.RequestedProcedureDescription = f"mammo for {PHI['PatientID']}"
    ds.RequestAttributesSequence = [request]
    block = ds.private_block(0x0009, "ACME 1.0", create=True)
    block.add_new(0x10, "LO", PHI["PatientName"])
    ds.file_meta.SourceApplicationEntityTitle = "HOSTILE_AE"
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path, {"study": str(ds.StudyInstanceUID), "series": str(ds.SeriesInstanceUID),
                  "sop": str(ds.SOPInstanceUID), "for": str(ds.get("FrameOfReferenceUID", ""))}


def burned_in_twin(path: Path, out: Path) -> str:
    """Another image of the same study (not a mammogram: the CAD leaves it) that says it shows burned-in text:
    never sent."""
    ds = pydicom.dcmread(path)
    ds.BurnedInAnnotation, ds.Modality = "YES", "DX"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.save_as(out, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


def assert_no_phi(data: bytes, originals: dict, where: str) -> None:
    text = data.decode("latin-1").lower()
    for keyword, value in PHI.items():
        for part in [value, *(p for p in value.split("^") if len(p) >= 3)] if keyword.endswith("Name") else [value]:
            assert part.lower() not in text, f"{where}: {keyword} ({part!r}) is in the copy"
    for name, uid in originals.items():
        assert not uid or uid not in text, f"{where}: the original {name} UID {uid} is in the copy"
    for secret in ("rp-secret-1", "sps-secret-1", "hostile_ae", STUDY_DATE):
        assert secret not in text, f"{where}: {secret!r} is in the copy"


@pytest.fixture
def research(make_node, storescp, moto, tmp_path):
    """A node whose rules run the CAD on mammograms and send de-identified copies of them to storescp and S3."""
    port, received = storescp
    bucket = moto.new_bucket()
    node = make_node(start=False, remote={"DEST": {"ae_title": "STORESCP", "host": "127.0.0.1", "port": port,
                                                   "server_name": "localhost"}},
                     storage={"s3": {"endpoint_url": moto.url}},
                     deid={"research": {"options": ["retain_longitudinal_modified_dates"]}},
                     router={"rules": [
                         {"name": "mammo", "match": {"Modality": "MG"}, "plugin": "mammo-cad", "quiet_seconds": 1},
                         {"name": "copies", "match": {"Modality": "MG"}, "deid": "research",
                          "deid_to": ["DEST", f"s3://{bucket}/trial/"], "quiet_seconds": 1}]})
    node.env.update(moto.CREDENTIALS)
    said = node.cli("deid", "secret", "research").stdout
    assert "0600" in said and (node.data_dir / "deid" / "research.key").stat().st_mode & 0o777 == 0o600
    node.start()
    return node, received, bucket


@pytest.mark.slow
@pytest.mark.interop
def test_a_rule_sends_de_identified_copies_with_the_cad_results_to_storescp_and_s3(research, moto, tmp_path):
    node, received, bucket = research
    image, originals = hostile_mammogram(tmp_path / "in", 5151)
    burned = burned_in_twin(image, tmp_path / "in" / "burned.dcm")
    node.storescu(image, tmp_path / "in" / "burned.dcm")

    def exported():
        rows = node.rows("SELECT destination, state, total, sent, dropped, error, pseudonym FROM deid_exports")
        return rows if len(rows) == 2 and all(r[1] in ("succeeded", "failed") for r in rows) else None
    rows = wait_for(exported, timeout=300, interval=0.5, what="both exports")
    assert all(r[1] == "succeeded" for r in rows), rows
    assert {(r[2], r[3], r[4]) for r in rows} == {(4, 3, 1)}, rows      # image, SR, SC sent; the burned-in one not
    pseudonym = rows[0][6]
    assert pseudonym.startswith("ANON-") and rows[1][6] == pseudonym

    copies = {}
    for path in received.iterdir():
        assert_no_phi(path.read_bytes(), {**originals, "burned": burned}, path.name)
        ds = pydicom.dcmread(path)
        copies[ds.Modality] = (path, ds)
    assert sorted(copies) == ["MG", "OT", "SR"]
    image_copy = copies["MG"][1]
    assert image_copy.PatientID == image_copy.PatientName == pseudonym and image_copy.PatientIdentityRemoved == "YES"
    assert all(ds.StudyInstanceUID == image_copy.StudyInstanceUID and ds.PatientID == pseudonym
               for _, ds in copies.values())
    moved = datetime.date(2025, 3, 14) - datetime.datetime.strptime(image_copy.StudyDate, "%Y%m%d").date()
    assert 1 <= moved.days <= 3650

    # the SR's evidence and its image references point at the copied image; the SC names it as its source
    sr = copies["SR"][1]
    evidence = {ref.ReferencedSOPInstanceUID for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}
    assert image_copy.SOPInstanceUID in evidence

    def references(items):
        for item in items:
            for ref in item.get("ReferencedSOPSequence", []):
                yield ref.ReferencedSOPInstanceUID
            yield from references(item.get("ContentSequence", []))
    assert image_copy.SOPInstanceUID in set(references(sr.ContentSequence))
    sc = copies["OT"][1]
    assert image_copy.SOPInstanceUID in {ref.ReferencedSOPInstanceUID for ref in sc.SourceImageSequence}

    # dciodvfy finds nothing new in the copy of the image
    assert dciodvfy_errors(copies["MG"][0]) <= dciodvfy_errors(image)

    # S3: the same copies, encrypted at rest, under pseudonym/study/series/instance
    s3 = moto.client()
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="trial/")["Contents"]
    assert len(listed) == 3 and all(o["Key"].startswith(f"trial/{pseudonym}/{image_copy.StudyInstanceUID}/")
                                    for o in listed)
    for item in listed:
        got = s3.get_object(Bucket=bucket, Key=item["Key"])
        assert got["ServerSideEncryption"] == "AES256"
        assert_no_phi(got["Body"].read(), originals, item["Key"])

    # the way back, for an admin, audited
    said = node.cli("deid", "lookup", pseudonym, "--json").stdout
    (entry,) = json.loads(said)
    assert entry["patient"]["patient_id"] == PHI["PatientID"]
    assert [s["study_uid"] for s in entry["studies"]] == [originals["study"]]
    assert node.rows("SELECT COUNT(*) FROM audit WHERE action='deid_lookup'") == [(1,)]
    assert pseudonym not in node.cli("deid", "lookup", "ANON-NOSUCHTHING", check=False).stdout

    # the same patient months later, sent by hand: the same pseudonym, the same interval between the dates
    later, later_uids = hostile_mammogram(tmp_path / "later", 6262, study_date="20250912")
    node.storescu(later)
    wait_for(lambda: len(node.rows("SELECT * FROM deid_exports WHERE study_uid=? AND state='succeeded'",
                                   (later_uids["study"],))) == 2, timeout=300, interval=0.5, what="the later exports")
    by_hand = node.cli("deid", later_uids["study"], "--to", "DEST", "--quiet")
    assert pseudonym in by_hand.stdout and "3 copies sent to DEST" in by_hand.stdout
    dates = sorted({pydicom.dcmread(p).StudyDate for p in received.iterdir()})
    assert len(dates) == 2
    first, second = (datetime.datetime.strptime(d, "%Y%m%d").date() for d in dates)
    assert (second - first).days == (datetime.date(2025, 9, 12) - datetime.date(2025, 3, 14)).days
    listing = node.cli("deid", "list").stdout
    assert listing.count(" succeeded study ") == 5 and "s3://" in listing


def test_refusals_are_clear_and_nothing_half_sent_is_done(make_node, tmp_path):
    """An unknown option or profile, a missing secret, a destination that refuses: one line, a failed export."""
    from node.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="unknown option 'retain_everything'"):
        from_dict({"deid": {"p": {"options": ["retain_everything"]}}}, tmp_path)
    with pytest.raises(ConfigError, match=r"no \[deid.nope\] profile"):
        from_dict({"router": {"rules": [{"name": "r", "deid": "nope", "deid_to": ["s3://b-1/x/"]}]}}, tmp_path)
    with pytest.raises(ConfigError, match="not \"s3://bucket/\""):
        from_dict({"deid": {"p": {}}, "router": {"rules": [{"name": "r", "deid": "p", "deid_to": ["s3://B/x"]}]}},
                  tmp_path)
    with pytest.raises(ConfigError, match="needs the option retain_safe_private"):
        from_dict({"deid": {"p": {"safe_private": ["0009,ACME,10"]}}}, tmp_path)

    closed = free_port()
    node = make_node(deid={"research": {}}, router={"enabled": False},
                     remote={"GONE": {"ae_title": "GONE", "host": "127.0.0.1", "port": closed, "tls": False}})
    image, uids = hostile_mammogram(tmp_path / "in", 7373)
    node.storescu(image)
    no_secret = node.cli("deid", uids["study"], "--to", "GONE", check=False)
    assert no_secret.returncode == 1 and "m3dicom deid secret research" in no_secret.stderr
    assert "Traceback" not in no_secret.stderr
    node.cli("deid", "secret", "research")
    again = node.cli("deid", "secret", "research", check=False)
    assert again.returncode == 1 and "--rotate" in again.stderr
    refused = node.cli("deid", uids["study"], "--to", "GONE", check=False)
    assert refused.returncode == 1 and "failed" in refused.stderr and "Traceback" not in refused.stderr
    assert refused.stderr.count("\n") == 1, refused.stderr                # said once, not logged as well
    unknown = node.cli("deid", uids["study"], "--to", "NOWHERE", check=False)
    assert unknown.returncode == 1 and "no [remote.NOWHERE] node" in unknown.stderr and "(configured: GONE)" in \
        unknown.stderr
    series = node.cli("deid", uids["series"], "--to", "GONE", check=False)
    assert series.returncode == 1 and "is a series UID, not a Study Instance UID" in series.stderr
    nothing = node.cli("deid", "1.2.3.4", "--to", "GONE", check=False)
    assert nothing.returncode == 1 and "not a study this node holds" in nothing.stderr
    # what was refused before it began left no export behind; the refused destination did, failed, with why
    states = node.rows("SELECT state, sent, error FROM deid_exports ORDER BY created_at")
    assert [s[0] for s in states] == ["failed"] and not states[0][1] and "connection refused" in states[0][2]
    assert node.cli("deid", "list").stdout.count(" failed study ") == 1


async def test_an_admin_queues_a_copy_from_the_study_page_and_sees_its_state(tmp_path, aiohttp_client):
    """The study page's panel (viewer/deid.py): admins only, configured destinations only, audited; the router
    runs what it queues (above), here its row is checked, and how a failed one reads."""
    import re

    from sqlalchemy import text

    from archive import Archive
    from helpers import synthetic_instances
    from node import owners
    from node.config import from_dict
    from router.deid import store
    from viewer import accounts
    from viewer.app import create_app

    config = from_dict({"node": {"data_dir": str(tmp_path / "var")}, "viewer": {"tls": False},
                        "deid": {"research": {}}, "remote": {"RESEARCH": {"ae_title": "RESEARCH", "host": "h"}},
                        "router": {"rules": [{"name": "r", "deid": "research", "deid_to": ["s3://trial-1/site/"]}]}},
                       tmp_path)
    archive = Archive(config.data_dir)
    owners.migrate(archive.index)
    password = "a long enough password"
    accounts.add_user(archive.index, "ada", password, "admin")
    accounts.add_user(archive.index, "carl", password, "clinician")
    (path,) = synthetic_instances(tmp_path / "a", 1, patient="Patient^A", patient_id="P-a")
    study = archive.ingest_file(path).study_uid
    app = create_app(config, archive)

    async def login(user):
        client = await aiohttp_client(app) if user == "ada" else await aiohttp_client(ada.server)
        assert (await client.post("/login", data={"user": user, "password": password},
                                  allow_redirects=False)).status == 302
        page = await (await client.get(f"/studies/{study}")).text()
        client.csrf = re.search(r'name="csrf-token" content="([^"]*)"', page).group(1)
        client.page = page
        return client
    try:
        ada = await login("ada")
        assert 'id="deid-title"' in ada.page
        listed = await (await ada.get(f"/api/studies/{study}/exports")).json()
        assert listed == {"exports": [], "profiles": ["research"], "why_not": None,
                          "destinations": ["RESEARCH", "s3://trial-1/site/"]}

        async def send(client, **body):
            return await client.post(f"/api/studies/{study}/exports", json=body, headers={"X-CSRF-Token": client.csrf})
        elsewhere = await send(ada, profile="research", to="s3://attacker-bucket/")
        assert elsewhere.status == 400 and "not a configured destination" in (await elsewhere.json())["error"]
        assert (await send(ada, profile="nope", to="RESEARCH")).status == 400
        no_secret = await send(ada, profile="research", to="RESEARCH")
        assert no_secret.status == 400 and "m3dicom deid secret research" in (await no_secret.json())["error"]
        from router.deid.export import make_secret
        make_secret(config, "research")
        assert (await ada.post(f"/api/studies/{study}/exports", json={"profile": "research", "to": "RESEARCH"}
                               )).status == 403                      # no CSRF token
        made = await send(ada, profile="research", to="RESEARCH")
        assert made.status == 201
        export_id = (await made.json())["export"]
        row = store.get(archive.index, export_id)
        assert (row.state, row.study_uid, row.destination, row.created_by) == ("queued", study, "RESEARCH", "ada")
        audited = archive.index.read(text("SELECT user_name, outcome FROM audit WHERE action = 'deid_export'"))
        assert [tuple(r) for r in audited] == [("ada", "refused")] * 3 + [("ada", "ok")]

        import time
        assert store.claim(archive.index, export_id, "test", time.time(), 60.0)
        assert store.fail(archive.index, export_id, "test", "RESEARCH: association refused", time.time(), 0.0,
                          final=True)
        (shown,) = (await (await ada.get(f"/api/studies/{study}/exports")).json())["exports"]
        assert shown["state"] == "failed" and shown["error"] == "RESEARCH: association refused"
        assert "worker" not in shown
        overview = await (await ada.get("/admin")).text()
        assert re.search(r"De-identified copies</dt><dd><span class=\"badge failed\">1 failed", overview)

        carl = await login("carl")
        assert 'id="deid-title"' not in carl.page
        assert (await carl.get(f"/api/studies/{study}/exports")).status == 403
        assert (await send(carl, profile="research", to="RESEARCH")).status == 403
        # a NUL is no name (PostgreSQL's audit refused it: a 500); a name that says "router" is not the router off
        nul = await send(ada, profile="research\x00", to="RESEARCH")
        assert nul.status == 400 and (await nul.json())["error"] == "expected {profile, to}"
        assert (await send(ada, profile="router", to="RESEARCH")).status == 400
    finally:
        archive.close()


@pytest.mark.interop
def test_copies_go_to_a_dicomweb_server_by_stow_rs_and_a_refusal_fails_the_export(make_node, pki, tmp_path):
    """Another m3dicom's DICOMweb (viewer on, a write token) as the destination; a read-only token is refused."""
    archive_node = make_node(viewer={"enabled": True, "port": free_port()}, router={"enabled": False})
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    for scope in ("write", "read"):
        (tokens / scope).write_text(archive_node.cli("token", "create", f"deid-{scope}", "--scope", scope).stdout)
        (tokens / scope).chmod(0o600)
    url = f"https://127.0.0.1:{archive_node.settings['viewer']['port']}/dicomweb"
    node = make_node(router={"enabled": False}, deid={"research": {}},
                     dicomweb={name: {"url": url, "token_file": str(tokens / scope),
                                      "ca_certificates": str(pki / "ca.pem")}
                               for name, scope in (("TRIAL", "write"), ("READONLY", "read"))})
    image, uids = hostile_mammogram(tmp_path / "in", 8484)
    node.storescu(image)
    node.cli("deid", "secret")
    sent = node.cli("deid", uids["study"], "--to", "TRIAL", "--quiet")
    assert "1 copy sent to TRIAL" in sent.stdout
    (row,) = archive_node.rows("SELECT p.patient_id, p.patient_name, i.blob_id FROM instances i JOIN series se ON "
                               "se.pk = i.series_pk JOIN studies st ON st.pk = se.study_pk JOIN patients p ON "
                               "p.pk = st.patient_pk")
    assert row[0].startswith("ANON-") and row[0] in sent.stdout
    assert_no_phi(archive_node.stored_bytes_of_blob(row[2]), uids, "the STOW-RS copy")
    refused = node.cli("deid", uids["study"], "--to", "READONLY", "--quiet", check=False)
    assert refused.returncode == 1 and "READONLY" in refused.stderr and "403" in refused.stderr, refused.stderr
    assert node.rows("SELECT destination, state FROM deid_exports ORDER BY created_at") == [
        ("TRIAL", "succeeded"), ("READONLY", "failed")]


@pytest.mark.browser
@pytest.mark.slow
def test_an_admin_sends_a_copy_from_the_study_page_on_a_phone_and_a_desktop(make_node, moto, tmp_path):
    """The panel in a real browser: the admin picks a destination, the router sends the copy to S3 (moto), the
    panel turns to "sent" by itself; screenshots on a 390x844 phone and a desktop, nothing wider than the phone."""
    import re

    from playwright.sync_api import sync_playwright

    from helpers import ROOT, synthetic_instances
    from test_viewer_browser import ARGS, CHROMIUM, DESKTOP

    bucket = moto.new_bucket()
    node = make_node(start=False, viewer={"enabled": True, "port": free_port()},
                     storage={"s3": {"endpoint_url": moto.url}},
                     deid={"research": {"options": ["retain_longitudinal_modified_dates"]}},
                     router={"rules": [{"name": "never", "match": {"Modality": "XX"}, "deid": "research",
                                        "deid_to": [f"s3://{bucket}/by-hand/"]}]})
    node.env.update({**moto.CREDENTIALS, "M3DICOM_ADMIN_PASSWORD": "a long enough password"})
    node.cli("deid", "secret")
    node.start()
    paths = synthetic_instances(tmp_path / "ct", 2, patient="Zyxwarden^Philomena", patient_id="PID-77-SECRET")
    node.storescu(*paths)
    study = str(pydicom.dcmread(paths[0]).StudyInstanceUID)
    url = f"https://127.0.0.1:{node.settings['viewer']['port']}"
    phone = {"ignore_https_errors": True, "viewport": {"width": 390, "height": 844}, "is_mobile": True,
             "has_touch": True, "device_scale_factor": 2}
    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        for number, (device, options) in enumerate((("phone", phone), ("desktop", DESKTOP))):
            page = browser.new_context(**options).new_page()
            page.goto(f"{url}/login")
            page.fill("input[name=user]", "admin")
            page.fill("input[name=password]", "a long enough password")
            page.click("button[type=submit]")
            page.wait_for_url(re.compile(r".*/studies"))
            page.goto(f"{url}/studies/{study}")
            page.wait_for_selector("#deid-form")
            assert page.locator("#deid-form select[name=to] option").all_inner_texts() == [f"s3://{bucket}/by-hand/"]
            page.click("#deid-form button[type=submit]")
            page.wait_for_selector(f"#exports li.succeeded >> nth={number}", timeout=60_000)
            said = page.inner_text("#exports li.succeeded >> nth=0")
            assert "2 of 2 sent" in said and "as ANON-" in said, said
            page.locator("#deid-title").scroll_into_view_if_needed()
            page.screenshot(path=str(artifacts / f"{device}-study-deid.png"), full_page=True)
            wide = page.evaluate("document.scrollingElement.scrollWidth")
            assert wide <= options["viewport"]["width"], f"the study page is {wide} px wide on a {device}"
        browser.close()
    keys = [o["Key"] for o in moto.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert len(keys) == 2 and all(k.startswith("by-hand/ANON-") for k in keys)    # the same copies twice


def test_the_export_queue_and_the_sealed_way_back_on_both_engines(tmp_path, index_url):
    """router/deid/store.py on SQLite and PostgreSQL: an export queued once, claimed by one worker, failed and
    queued again, then failed for good; the originals sealed (not in the index in the clear) and opened."""
    import time

    from archive import Archive
    from node import owners
    from router.deid import store

    archive = Archive(tmp_path / "var", index_url=index_url or None)
    try:
        index = archive.index
        owners.migrate(index)
        now = time.time()
        first = store.create(index, study_uid="1.2.3", profile="p", destination="D", max_attempts=2, now=now)
        assert store.create(index, study_uid="1.2.3", profile="p", destination="D", max_attempts=2) == first
        assert store.due(index, now) == [first]
        assert store.claim(index, first, "a", now, 60) and not store.claim(index, first, "b", now, 60)
        assert store.fail(index, first, "a", "refused", now, now + 5)              # attempt 1 of 2: again
        assert store.get(index, first).state == "queued" and store.due(index, now) == []
        assert store.claim(index, first, "b", now + 5, 60)
        assert not store.succeed(index, first, "a", now + 6)                      # not a's any more
        assert store.fail(index, first, "b", "refused again", now + 6, now + 10)
        assert (store.get(index, first).state, store.get(index, first).error) == ("failed", "refused again")
        assert store.counts_by_state(index) == {"failed": 1}
        # the router running an export dies on its last attempt (an instance that kills it): failed, not taken
        # up again after every restart
        dying = store.create(index, study_uid="1.2.9", profile="p", destination="D", max_attempts=1, now=now)
        assert store.claim(index, dying, "a", now, 60)
        assert not store.claim(index, dying, "b", now + 30, 60)                  # a's lease still holds
        assert store.due(index, now + 61) == [dying] and not store.claim(index, dying, "b", now + 61, 60)
        found = store.get(index, dying)
        assert found.state == "failed" and "stopped before it ended" in found.error
        assert store.due(index, now + 61) == []

        store.remember(index, archive.keyring, project="p", pseudonym="ANON-X", key_mac="k1",
                       patient={"patient_id": "PID-SEALED"}, study_uid="2.25.9", study={"study_uid": "1.2.3"})
        store.remember(index, archive.keyring, project="p", pseudonym="ANON-X", key_mac="k1",
                       patient={"patient_id": "PID-SEALED"}, study_uid="2.25.10", study={"study_uid": "1.2.4"})
        with pytest.raises(store.PseudonymClash):
            store.remember(index, archive.keyring, project="p", pseudonym="ANON-X", key_mac="k2",
                           patient={"patient_id": "OTHER"}, study_uid="2.25.11", study={"study_uid": "1.2.5"})
        (found,) = store.lookup(index, archive.keyring, "ANON-X")
        assert found["patient"] == {"patient_id": "PID-SEALED"}
        assert [s["study_uid"] for s in found["studies"]] == ["1.2.3", "1.2.4"]
        assert store.lookup(index, archive.keyring, "2.25.10")[0]["pseudonym"] == "ANON-X"
        from sqlalchemy import text
        sealed = b"".join(bytes(r[0]) for r in index.read(text("SELECT sealed FROM deid_patients")))
        assert b"PID-SEALED" not in sealed
        archive.keyring.local.add_new()                     # `m3dicom keys rotate`: the way back re-wrapped
        assert store.rewrap(index, archive.keyring) == 3 and store.rewrap(index, archive.keyring) == 0
        assert store.lookup(index, archive.keyring, "ANON-X")[0]["patient"] == {"patient_id": "PID-SEALED"}
    finally:
        archive.close()
