"""DICOMweb (issue 17) against a running node over HTTPS: dicomweb-client with API tokens, the viewer's
session and a share link's; QIDO-RS at every level, WADO-RS, STOW-RS, and the refusals."""
from __future__ import annotations

import dataclasses
import gzip
import http.client
import io
import json
import socket
import ssl
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from PIL import Image
from pydicom.data import get_testdata_file

from archive.crypto import IntegrityError
from helpers import Node, free_port, synthetic_instances, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.interop]
PASSWORD = "dicomweb-test-password"
OHIF_ELSEWHERE = "https://ohif.example:8443"
J2K, RLE, MULTIFRAME = (get_testdata_file(n) for n in ("JPEG2000.dcm", "MR_small_RLE.dcm", "emri_small.dcm"))


def dataset_bytes(data: bytes) -> bytes:
    """A Part 10 file's data set (what a C-STORE carries), without its preamble and meta group (its
    length is the value of (0002,0000), the group's first element)."""
    assert data[128:132] == b"DICM" and data[132:138] == b"\x02\x00\x00\x00UL"
    return data[144 + int.from_bytes(data[140:144], "little"):]


@pytest.fixture(scope="module")
def site(tmp_path_factory, pki):
    """A node with its viewer; two CT studies and a multi-frame MR over DICOM TLS; tokens."""
    work = tmp_path_factory.mktemp("dicomweb")
    node = Node(work / "node", pki, viewer={"enabled": True, "port": free_port(), "cors_origins": [OHIF_ELSEWHERE]})
    node.env["M3DICOM_ADMIN_PASSWORD"] = PASSWORD
    node.start()
    smith = synthetic_instances(work / "smith", 3, patient="Smith^John", patient_id="P-SMITH")
    jones = synthetic_instances(work / "jones", 1, patient="Jones^Ann", patient_id="P-JONES")
    node.storescu(*smith, *jones, MULTIFRAME)
    wait_for(lambda: node.rows("SELECT COUNT(*) FROM instances")[0][0] == 5, what="the instances")
    tokens = {name: node.cli("token", "create", name, "--scope", scope).stdout
              for name, scope in (("reader", "read"), ("writer", "write"), ("gone", "read"))}
    node.cli("token", "revoke", "gone")
    url = f"https://127.0.0.1:{node.settings['viewer']['port']}"
    studies = {"smith": pydicom.dcmread(smith[0]).StudyInstanceUID, "jones": pydicom.dcmread(jones[0]).StudyInstanceUID,
               "mr": pydicom.dcmread(MULTIFRAME).StudyInstanceUID}
    yield node, url, tokens, studies, {"smith": smith, "jones": jones}
    node.stop()


def session(pki, token: str | None = None) -> requests.Session:
    s = requests.Session()
    s.trust_env = False                  # REQUESTS_CA_BUNDLE in the environment would win over `verify`
    s.verify = str(pki / "ca.pem")
    if token:
        s.headers["Authorization"] = f"Bearer {token.strip()}"
    return s


def client(site, pki, name: str = "reader"):
    from dicomweb_client import DICOMwebClient

    _, url, tokens, _, _ = site
    return DICOMwebClient(f"{url}/dicomweb", session=session(pki, tokens[name]))


# -- tokens --------------------------------------------------------------------------------------

def test_a_token_is_printed_alone_stored_hashed_and_listed_without_it(site):
    node, _, tokens, _, _ = site
    assert all(len(t.splitlines()) == 1 and t.startswith("m3t_") for t in tokens.values())
    stored = node.rows("SELECT name, token_hash, scope FROM api_tokens ORDER BY name")
    assert [(n, s) for n, _, s in stored] == [("gone", "read"), ("reader", "read"), ("writer", "write")]
    assert not any(t.strip() in h for t in tokens.values() for _, h, _ in stored)        # the hash only
    listed = node.cli("token", "list").stdout
    assert "reader read live" in listed and "gone read revoked" in listed
    assert not any(t.strip() in listed for t in tokens.values())
    again = node.cli("token", "create", "reader", "--scope", "read", check=False)
    assert again.returncode == 1 and "live token" in again.stderr and not again.stdout


def test_no_token_a_bad_one_and_a_revoked_one_get_the_same_401(site, pki):
    _, url, tokens, _, _ = site
    answers = [session(pki, token).get(f"{url}/dicomweb/studies")
               for token in (None, "m3t_" + "x" * 43, tokens["gone"], "not a token at all")]
    assert [a.status_code for a in answers] == [401] * 4
    assert all(a.headers["WWW-Authenticate"].startswith("Bearer") for a in answers)
    assert len({a.text for a in answers}) == 1                   # no hint which
    assert "Location" not in answers[0].headers                   # a program is not sent to the login page


def test_a_token_ends_after_its_days(site, pki):
    import time

    node, url, _, _, _ = site
    brief = node.cli("token", "create", "brief", "--days", "0.00001").stdout        # 0.86 seconds
    time.sleep(1)
    answer = session(pki, brief).get(f"{url}/dicomweb/studies")
    assert answer.status_code == 401 and answer.headers["WWW-Authenticate"].startswith("Bearer")
    assert "brief read expired" in node.cli("token", "list").stdout


def test_cors_only_for_the_listed_origins_and_without_credentials(site, pki):
    _, url, tokens, _, _ = site
    preflight = session(pki).options(f"{url}/dicomweb/studies", headers={
        "Origin": OHIF_ELSEWHERE, "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization"})
    assert preflight.status_code == 204 and "GET" in preflight.headers["Access-Control-Allow-Methods"]
    assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
    assert preflight.headers["Access-Control-Allow-Origin"] == OHIF_ELSEWHERE
    listed = session(pki, tokens["reader"]).get(f"{url}/dicomweb/studies", headers={"Origin": OHIF_ELSEWHERE})
    assert listed.headers["Access-Control-Allow-Origin"] == OHIF_ELSEWHERE and "ETag" in listed.headers[
        "Access-Control-Expose-Headers"] and "Access-Control-Allow-Credentials" not in listed.headers
    refused = session(pki).get(f"{url}/dicomweb/studies", headers={"Origin": OHIF_ELSEWHERE})
    assert refused.status_code == 401 and refused.headers["Access-Control-Allow-Origin"] == OHIF_ELSEWHERE
    other = "https://evil.example"
    assert "Access-Control-Allow-Origin" not in session(pki, tokens["reader"]).get(
        f"{url}/dicomweb/studies", headers={"Origin": other}).headers
    assert session(pki).options(f"{url}/dicomweb/studies", headers={
        "Origin": other, "Access-Control-Request-Method": "GET"}).status_code == 403
    assert "Access-Control-Allow-Origin" not in session(pki).get(f"{url}/login",
                                                                 headers={"Origin": OHIF_ELSEWHERE}).headers


# -- QIDO-RS -------------------------------------------------------------------------------------

def test_qido_at_every_level_with_each_kind_of_matching(site, pki):
    _, url, _, studies, files = site
    dw = client(site, pki)
    uids = lambda found, keyword="StudyInstanceUID": sorted(pydicom.Dataset.from_json(f)[keyword].value  # noqa: E731
                                                               for f in found)
    assert uids(dw.search_for_studies(search_filters={"PatientID": "P-SMITH"})) == [studies["smith"]]
    assert uids(dw.search_for_studies(search_filters={"PatientName": "smi*"})) == [studies["smith"]]   # any case
    assert uids(dw.search_for_studies(search_filters={"PatientName": "jon"}, fuzzymatching=True)) == \
        [studies["jones"]]
    assert uids(dw.search_for_studies(search_filters={"StudyDate": "20000101-20001231"})) == [studies["mr"]]
    listed = dw.search_for_studies(search_filters={"StudyInstanceUID": f"{studies['smith']},{studies['mr']}"})
    assert uids(listed) == sorted([studies["smith"], studies["mr"]])
    assert uids(dw.search_for_studies(search_filters={"00100020": "P-JONES"})) == [studies["jones"]]   # a tag
    study = pydicom.Dataset.from_json(dw.search_for_studies(search_filters={"PatientID": "P-SMITH"})[0])
    assert study.NumberOfStudyRelatedInstances == 3 and study.ModalitiesInStudy == "CT"
    assert study.RetrieveURL == f"{url}/dicomweb/studies/{studies['smith']}"
    everything = pydicom.Dataset.from_json(dw.search_for_studies(search_filters={"PatientID": "P-SMITH"},
                                                                 fields=["all"])[0])
    assert everything.NumberOfStudyRelatedSeries == 1 and "StudyID" in everything
    pages = [uids(dw.search_for_studies(limit=1, offset=n)) for n in range(4)]
    assert [len(p) for p in pages] == [1, 1, 1, 0] and len({p[0] for p in pages[:3]}) == 3

    series = dw.search_for_series(studies["smith"])
    assert len(series) == 1 and pydicom.Dataset.from_json(series[0]).NumberOfSeriesRelatedInstances == 3
    series_uid = str(pydicom.Dataset.from_json(series[0]).SeriesInstanceUID)
    assert uids(dw.search_for_series(search_filters={"Modality": "MR"}), "SeriesInstanceUID") == \
        [str(pydicom.dcmread(MULTIFRAME).SeriesInstanceUID)]
    instances = dw.search_for_instances(studies["smith"], series_uid, search_filters={"InstanceNumber": "2"})
    assert len(instances) == 1
    found = pydicom.Dataset.from_json(instances[0])
    assert found.SOPInstanceUID == pydicom.dcmread(files["smith"][1]).SOPInstanceUID
    assert found.RetrieveURL.endswith(f"/series/{series_uid}/instances/{found.SOPInstanceUID}")
    image = pydicom.dcmread(files["smith"][1])                   # PS3.18 Table 10.6.3-5: the image's size
    assert (found.Rows, found.Columns, found.BitsAllocated) == (image.Rows, image.Columns, image.BitsAllocated)
    assert "NumberOfFrames" in found and found["NumberOfFrames"].value in (None, "")
    multiframe = pydicom.dcmread(MULTIFRAME)
    (mf,) = dw.search_for_instances(search_filters={"SOPInstanceUID": str(multiframe.SOPInstanceUID)})
    mf = pydicom.Dataset.from_json(mf)
    assert (mf.NumberOfFrames, mf.Rows, mf.Columns) == (multiframe.NumberOfFrames, multiframe.Rows, multiframe.Columns)
    everywhere = dw.search_for_instances(search_filters={"SOPInstanceUID": str(found.SOPInstanceUID)})
    assert [pydicom.Dataset.from_json(i).PatientID for i in everywhere] == ["P-SMITH"]     # the study's too


def test_qido_answers_204_400_and_gzip(site, pki):
    _, url, tokens, _, _ = site
    s = session(pki, tokens["reader"])
    assert s.get(f"{url}/dicomweb/studies", params={"PatientID": "NOBODY"}).status_code == 204
    for params, said in (({"NoSuchThing": "1"}, "NoSuchThing"), ({"StudyDate": "2024-13"}, "StudyDate"),
                         ({"SOPInstanceUID": "1.2"}, "cannot be matched at this level"),
                         ({"limit": "many"}, "limit"), ({"offset": "9" * 30}, "offset"),
                         ({"NumberOfStudyRelatedSeries": "*x-1"}, "NumberOfStudyRelatedSeries"),
                         ({"includefield": "Nonsense"}, "Nonsense")):
        answer = s.get(f"{url}/dicomweb/studies", params=params)
        assert answer.status_code == 400 and said in answer.json()["error"], (params, answer.text)
    raw = s.get(f"{url}/dicomweb/studies", headers={"Accept-Encoding": "gzip"}, stream=True)
    assert raw.headers["Content-Encoding"] == "gzip" and raw.headers["Content-Type"].startswith(
        "application/dicom+json")
    assert isinstance(json.loads(gzip.decompress(raw.raw.read())), list)
    for wrong in ("/studies", "/dicom-web/studies", "/wado/studies"):     # a program with a wrong URL prefix:
        answer = s.get(f"{url}{wrong}", allow_redirects=False)            # told where DICOMweb is, not the login
        assert answer.status_code == 404 and "DICOMweb is under /dicomweb" in answer.json()["error"], wrong


# -- WADO-RS -------------------------------------------------------------------------------------

def test_wado_instance_bytes_metadata_frames_and_rendered(site, pki):
    _, url, tokens, studies, files = site
    dw = client(site, pki)
    sent = pydicom.dcmread(files["smith"][0])
    study, series, sop = studies["smith"], str(sent.SeriesInstanceUID), str(sent.SOPInstanceUID)
    s = session(pki, tokens["reader"])
    answer = s.get(f"{url}/dicomweb/studies/{study}/series/{series}/instances/{sop}",
                   headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    assert answer.status_code == 200 and answer.headers["Content-Type"].startswith("multipart/related")
    part = next(dw._decode_multipart_message(answer, stream=False))
    assert dataset_bytes(part) == dataset_bytes(files["smith"][0].read_bytes())        # as storescu sent it
    etag = answer.headers["ETag"]
    assert s.get(answer.url, headers={"If-None-Match": etag, "Accept": answer.request.headers["Accept"]}).status_code \
        == 304 and answer.headers["Last-Modified"]
    assert len(dw.retrieve_series(study, series)) == 3 and len(dw.retrieve_study(study)) == 3

    metadata = dw.retrieve_series_metadata(study, series)
    assert len(metadata) == 3
    bulk = {}

    def fetch(tag, vr, uri):
        bulk[tag] = uri
        return dw.retrieve_bulkdata(uri)[0]

    back = pydicom.Dataset.from_json(dw.retrieve_instance_metadata(study, series, sop), bulk_data_uri_handler=fetch)
    assert back.PatientID == "P-SMITH" and back.Rows == sent.Rows and bytes(back.PixelData) == sent.PixelData
    assert set(bulk) == {"7FE00010", "00431029"}                # the pixels, and a large private OB value

    mr = pydicom.dcmread(MULTIFRAME)
    frames = dw.retrieve_instance_frames(studies["mr"], str(mr.SeriesInstanceUID), str(mr.SOPInstanceUID), [1, 3])
    pixels = mr.pixel_array
    for data, n in zip(frames, (0, 2)):
        assert np.array_equal(np.frombuffer(data, pixels.dtype).reshape(pixels.shape[1:]), pixels[n])

    jpeg = dw.retrieve_instance_rendered(study, series, sop, media_types=("image/jpeg",), params={"viewport": "64,64"})
    image = Image.open(io.BytesIO(jpeg))
    assert image.format == "JPEG" and image.size == (64, 64)
    for window in ("nan,400", "40,inf", "40"):
        assert s.get(f"{url}/dicomweb/studies/{study}/series/{series}/instances/{sop}/rendered",
                     params={"window": window}).status_code == 400
    thumbnail = s.get(f"{url}/dicomweb/studies/{study}/thumbnail")
    assert thumbnail.headers["Content-Type"] == "image/jpeg" and Image.open(io.BytesIO(thumbnail.content)).size == \
        (128, 128)


def test_a_study_of_small_and_large_instances_streams_whole_and_a_broken_off_one_is_audited(site, pki, tmp_path):
    """Small instances go out of memory in batches, larger ones (over wado.INLINE) through a private file,
    in the index's order; every byte is what was sent. A client that stops reading after the first
    kilobytes leaves an audit row that says so, with what it took, and nothing in exports/."""
    node, url, tokens, _, _ = site
    study = pydicom.uid.generate_uid()
    small = synthetic_instances(tmp_path / "small", 3, study=study, patient="Stream^Big", patient_id="P-STREAM")
    large = synthetic_instances(tmp_path / "large", 3, pixel_bytes=6 << 20, study=study, patient="Stream^Big",
                                patient_id="P-STREAM")
    node.storescu(*small, *large)
    wait_for(lambda: node.rows("SELECT COUNT(*) FROM instances i JOIN series s ON s.pk = i.series_pk "
                               "JOIN studies t ON t.pk = s.study_pk WHERE t.study_uid = ?", (study,))[0][0] == 6,
             what="the six instances")
    s, accept = session(pki, tokens["reader"]), {"Accept": 'multipart/related; type="application/dicom"; '
                                                          'transfer-syntax=*'}
    from dicomweb_client import DICOMwebClient

    answer = s.get(f"{url}/dicomweb/studies/{study}", headers=accept)
    assert int(answer.headers["Content-Length"]) == len(answer.content)     # counted from the index: not chunked
    assert "Transfer-Encoding" not in answer.headers
    parts = list(DICOMwebClient(f"{url}/dicomweb", session=s)._decode_multipart_message(answer, stream=False))
    sent = {pydicom.dcmread(p).SOPInstanceUID: dataset_bytes(p.read_bytes()) for p in (*small, *large)}
    got = {pydicom.dcmread(io.BytesIO(p)).SOPInstanceUID: dataset_bytes(p) for p in parts}
    assert got == sent

    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    raw = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(f"GET /dicomweb/studies/{study} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: {accept['Accept']}\r\n"
                    f"Authorization: Bearer {tokens['reader'].strip()}\r\n\r\n".encode())
        taken = 0
        while taken < 64 << 10:
            taken += len(tls.recv(16 << 10))
    raw.close()                                   # the client goes away after 64 KiB
    row = wait_for(lambda: node.rows("SELECT detail FROM audit WHERE study_uid = ? AND detail LIKE '%broken off%'",
                                     (study,)), what="the broken-off retrieve's audit row")
    took = int(row[0][0].split(" instances, ")[1].split(" bytes")[0])
    assert taken <= took < 18 << 20                 # what left, not the study's size
    wait_for(lambda: not any((node.data_dir / "exports").iterdir()), what="exports/ emptied")


def test_stow_then_wado_compressed_as_stored_and_decoded(site, pki):
    node, url, tokens, _, _ = site
    writer, reader = client(site, pki, "writer"), client(site, pki)
    j2k, rle = pydicom.dcmread(J2K), pydicom.dcmread(RLE)
    with pytest.raises(requests.HTTPError) as refused:                 # a read token does not store
        reader.store_instances([j2k])
    assert refused.value.response.status_code == 403
    answer = writer.store_instances([j2k, rle])
    assert {str(i.ReferencedSOPInstanceUID) for i in answer.ReferencedSOPSequence} == {j2k.SOPInstanceUID,
                                                                                        rle.SOPInstanceUID}
    assert "FailedSOPSequence" not in answer
    study, series, sop = str(j2k.StudyInstanceUID), str(j2k.SeriesInstanceUID), str(j2k.SOPInstanceUID)
    as_stored = reader.retrieve_instance(study, series, sop, media_types=(("application/dicom", "*"),))
    assert as_stored.file_meta.TransferSyntaxUID == j2k.file_meta.TransferSyntaxUID
    with open(J2K, "rb") as fh:
        assert dataset_bytes(node.stored_bytes(sop)) == dataset_bytes(fh.read())
    decoded = reader.retrieve_instance(study, series, sop, media_types=(("application/dicom", "1.2.840.10008.1.2.1"),))
    assert decoded.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert np.array_equal(decoded.pixel_array, j2k.pixel_array)
    frame, = reader.retrieve_instance_frames(study, series, sop, [1])
    assert np.array_equal(np.frombuffer(frame, j2k.pixel_array.dtype).reshape(j2k.pixel_array.shape),
                          j2k.pixel_array)
    from pydicom.encaps import get_frame

    as_sent, = reader.retrieve_instance_frames(study, series, sop, [1], media_types=(
        ("application/octet-stream", "*"),))                    # the stored codestream, as OHIF asks for it
    assert as_sent == get_frame(j2k.PixelData, 0, number_of_frames=1)


def test_stow_refusals_fail_alone_and_store_nothing_wrong(site, pki):
    node, url, tokens, studies, _ = site
    s = session(pki, tokens["writer"])
    before = node.rows("SELECT COUNT(*) FROM instances")[0][0]
    boundary = "b0undary"
    good = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    with open(get_testdata_file("CT_small.dcm"), "rb") as fh:
        ct = fh.read()

    def body(*parts: bytes) -> bytes:
        return b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n"
                        for p in parts) + f"--{boundary}--\r\n".encode()

    mixed = s.post(f"{url}/dicomweb/studies", data=body(b"this is not DICOM at all" * 10, ct),
                   headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
    assert mixed.status_code == 202, mixed.text
    answer = pydicom.Dataset.from_json(mixed.json())
    assert [i.FailureReason for i in answer.FailedSOPSequence] == [0xC000]
    assert [i.ReferencedSOPInstanceUID for i in answer.ReferencedSOPSequence] == [good.SOPInstanceUID]
    assert "STOW-RS from token:writer: part 1 refused: not a DICOM Part 10" in node.log(), node.log()[-2000:]
    wrong_study = s.post(f"{url}/dicomweb/studies/{studies['smith']}", data=body(ct),
                         headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
    assert wrong_study.status_code == 409
    assert pydicom.Dataset.from_json(wrong_study.json()).FailedSOPSequence[0].FailureReason == 0xA900
    no_boundary = s.post(f"{url}/dicomweb/studies", data=body(ct),
                         headers={"Content-Type": 'multipart/related; type="application/dicom"'})
    assert no_boundary.status_code == 400 and "boundary" in no_boundary.json()["error"]
    assert node.rows("SELECT COUNT(*) FROM instances")[0][0] == before + 1             # CT_small alone
    huge = http_request(site, pki, "POST", "/dicomweb/studies", tokens["writer"], headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Content-Length": str(10 << 30)})
    assert huge[0] == 413


def http_request(site, pki, method: str, path: str, token: str | None, headers: dict | None = None):
    """(status, body) of a request sent as written: no client normalises its path (`..` stays)."""
    _, url, _, _, _ = site
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    conn = http.client.HTTPSConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), context=context, timeout=30)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in {**({"Authorization": f"Bearer {token.strip()}"} if token else {}),
                            **(headers or {})}.items():
            conn.putheader(name, value)
        conn.endheaders()
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


def test_hostile_uids_and_dot_segments_in_every_path_segment(site, pki):
    _, _, tokens, studies, files = site
    sent = pydicom.dcmread(files["smith"][0])
    study, series, sop = studies["smith"], sent.SeriesInstanceUID, sent.SOPInstanceUID
    hostile = ("..", "%2e%2e", "..%2f..%2fetc", "1.2.3%00", "1" * 65, "1.2.x", "1.2.3'--", "%252e%252e")
    for bad in hostile:
        for path in (f"/dicomweb/studies/{bad}", f"/dicomweb/studies/{bad}/series",
                     f"/dicomweb/studies/{study}/series/{bad}/metadata",
                     f"/dicomweb/studies/{study}/series/{series}/instances/{bad}",
                     f"/dicomweb/studies/{study}/series/{series}/instances/{sop}/frames/{bad}",
                     f"/dicomweb/studies/{study}/series/{series}/instances/{sop}/bulkdata/{bad}"):
            status, _ = http_request(site, pki, "GET", path, tokens["reader"])
            frame_number = bad.isdigit() and path.endswith(f"/frames/{bad}")       # a frame it does not have
            assert status == (404 if frame_number else 400), (path, status)
    status, _ = http_request(site, pki, "GET", f"/dicomweb/studies/{study}/../../../login", tokens["reader"])
    assert status in (400, 404)
    # one frame named 1,000 times made a 0.5 GB answer in memory from a small instance (the attack pass): 400
    status, body = http_request(site, pki, "GET", f"/dicomweb/studies/{study}/series/{series}/instances/{sop}"
                                                  f"/frames/{','.join(['1'] * 1000)}", tokens["reader"])
    assert status == 400 and b"each frame at most once" in body, (status, body[:200])


# -- sessions and share links ----------------------------------------------------------------------

def test_the_viewers_session_and_a_share_link_limited_to_its_study(site, pki):
    node, url, _, studies, _ = site
    person = session(pki)
    assert person.post(f"{url}/login", data={"user": "admin", "password": PASSWORD, "next": "/studies"}).ok
    assert person.get(f"{url}/dicomweb/studies").status_code == 200
    no_csrf = person.post(f"{url}/dicomweb/studies", data=b"x", headers={
        "Content-Type": 'multipart/related; type="application/dicom"; boundary=x'})
    assert no_csrf.status_code == 403                         # a cookie's POST passes the CSRF rule first
    page = person.get(f"{url}/studies").text
    csrf = page.split('name="csrf-token" content="')[1].split('"')[0]
    with open(MULTIFRAME, "rb") as fh:                         # with its CSRF token, a user's session stores
        again = person.post(f"{url}/dicomweb/studies", data=b"--x\r\nContent-Type: application/dicom\r\n\r\n" +
                            fh.read() + b"\r\n--x--\r\n", headers={
                                "X-CSRF-Token": csrf,
                                "Content-Type": 'multipart/related; type="application/dicom"; boundary=x'})
    assert again.status_code == 200, again.text                 # already stored: stored
    link = person.post(f"{url}/api/studies/{studies['smith']}/share", json={"days": 1},
                       headers={"X-CSRF-Token": csrf}).json()["url"]
    guest = session(pki)
    assert guest.get(link).ok
    seen = guest.get(f"{url}/dicomweb/studies")
    assert [pydicom.Dataset.from_json(s).StudyInstanceUID for s in seen.json()] == [studies["smith"]]
    assert guest.get(f"{url}/dicomweb/studies", params={"StudyInstanceUID": studies["jones"]}).status_code == 204
    assert guest.get(f"{url}/dicomweb/series", params={"Modality": "MR"}).status_code == 204
    assert guest.get(f"{url}/dicomweb/studies/{studies['smith']}/metadata").status_code == 200
    for path in (f"/studies/{studies['jones']}/metadata", f"/studies/{studies['jones']}",
                 f"/studies/{studies['jones']}/series"):
        assert guest.get(f"{url}/dicomweb{path}").status_code == 404, path
    assert guest.post(f"{url}/dicomweb/studies", data=b"", headers={"X-CSRF-Token": "x"}).status_code == 403


def test_a_new_studys_metadata_is_made_ahead_of_its_first_request(site, pki):
    """viewer.prefetch: once a study has received nothing for wado.PREFETCH_QUIET seconds, its metadata is read
    into the cache, so OHIF's first request waits for no instance: here its one blob is taken away first, and
    the metadata is still answered (only a prefetched copy can say it)."""
    from viewer import wado

    node, url, tokens, studies, _ = site
    (blob_id,), = node.rows("SELECT i.blob_id FROM instances i JOIN series s ON s.pk = i.series_pk JOIN studies t "
                            "ON t.pk = s.study_pk WHERE t.study_uid = ?", (studies["jones"],))
    blob = node.data_dir / "blobs" / blob_id[:2] / blob_id
    stored_at = blob.stat().st_mtime
    wait_for(lambda: time.time() - stored_at > wado.PREFETCH_QUIET + 4 * wado.PREFETCH_POLL + 5, timeout=60,
             what="the study to be quiet long enough")
    aside = blob.with_name(blob.name + ".aside")
    blob.rename(aside)
    try:
        answer = session(pki, tokens["reader"]).get(f"{url}/dicomweb/studies/{studies['jones']}/metadata")
    finally:
        aside.rename(blob)
    assert answer.status_code == 200, answer.text
    found, = answer.json()
    assert found["00100010"]["Value"] == [{"Alphabetic": "Jones^Ann"}]
    assert found["7FE00010"]["BulkDataURI"].startswith(f"{url}/dicomweb/studies/{studies['jones']}/")


def test_every_call_is_audited_with_who_what_study_and_bytes(site):
    node, _, _, studies, _ = site
    rows = node.rows("SELECT user_name, study_uid, outcome, detail FROM audit WHERE action = 'dicomweb'")
    assert any(r[0] == "token:reader" and r[1] == studies["smith"] and "bytes" in r[3] for r in rows)
    assert any(r[0] == "token:?" and r[2] == "refused" for r in rows)
    assert any(r[0] == "token:writer" and r[3].startswith("POST STOW: ") and "2 stored" in r[3] for r in rows)


@pytest.mark.parametrize("inline", [True, False], ids=["in memory", "through a file"])
def test_frames_read_from_their_place_in_the_file_equal_pydicoms_pixels(tmp_path, monkeypatch, inline):
    """What WADO-RS sends when the viewer does not hold the decoded image (wado._frames): a native frame read
    from its offset in the decrypted instance, a compressed one decoded by itself; Big Endian swapped; a
    deflated one inflated first. Instances up to wado.INLINE bytes are read in memory, larger through a file."""
    from archive import Archive
    from viewer import wado

    planar = pydicom.dcmread(get_testdata_file("SC_rgb_2frame.dcm"))       # colour planes one after the other
    planar.PixelData, planar.PlanarConfiguration = planar.pixel_array.transpose(0, 3, 1, 2).tobytes(), 1
    planar.save_as(tmp_path / "planar.dcm", enforce_file_format=True)
    archive = Archive(tmp_path / "var")
    if not inline:
        monkeypatch.setattr(wado, "INLINE", 0)
    try:
        for name, numbers in (("emri_small.dcm", [1, 3, 10]), ("MR_small_bigendian.dcm", [1]), ("image_dfl.dcm", [1]),
                              ("JPEG2000.dcm", [1]), ("SC_rgb_rle_2frame.dcm", [2]), ("ExplVR_BigEnd.dcm", [1]),
                              (tmp_path / "planar.dcm", [1, 2])):
            path = name if isinstance(name, Path) else get_testdata_file(name)
            assert archive.ingest_file(path).outcome.ok, name
            ds = pydicom.dcmread(path)
            match, = wado._instances(archive.index, str(ds.StudyInstanceUID), None, str(ds.SOPInstanceUID))
            frame_shape = ds.pixel_array.shape[-3:] if ds.get("SamplesPerPixel", 1) == 3 else ds.pixel_array.shape[-2:]
            pixels = ds.pixel_array.reshape((int(ds.get("NumberOfFrames", 1) or 1), *frame_shape))
            for data, n in zip(wado._frames(archive, match, numbers), numbers):
                assert data == np.ascontiguousarray(pixels[n - 1]).astype(pixels.dtype.newbyteorder("<")).tobytes(), \
                    (name, n)
            with pytest.raises(wado._NoSuchFrame):
                wado._frames(archive, match, [pixels.shape[0] + 1])
            kept = wado._metadata(archive, match, wado.Cache(1 << 20))       # kept once, whatever the base URL
            for base in ("https://node/dicomweb", "https://other:8443/x/dicomweb"):
                metadata = json.loads(wado._based(kept, base))
                assert metadata["00080018"]["Value"] == [ds.SOPInstanceUID]
                assert metadata["7FE00010"]["BulkDataURI"].startswith(f"{base}/studies/{ds.StudyInstanceUID}/")
        assert not any(archive.exports.iterdir())
    finally:
        archive.close()


def test_a_retrieve_reads_batches_planned_from_the_indexed_sizes():
    """Consecutive small instances up to wado.BATCH bytes a batch; one over wado.INLINE, or one to transcode,
    alone (a private file)."""
    from archive.query import Match
    from viewer import wado

    def found(*sizes, syntax=wado.EVLE):
        return [Match(n, "1.2", f"1.2.{n}", syntax, f"b{n}", "00", 0.0, size) for n, size in enumerate(sizes)]

    small, half, large = wado.BATCH // 4, wado.BATCH // 2, wado.INLINE + 1
    assert wado._plan(found(small, small, small), None) == [(0, 3)]
    assert wado._plan(found(half, half, half, small), None) == [(0, 2), (2, 4)]
    assert wado._plan(found(small, large, small, small, large), None) == [(0, 1), (1, 2), (2, 4), (4, 5)]
    assert wado._plan(found(large), None) == [(0, 1)] and wado._plan([], None) == []
    jpeg = found(small, small, syntax="1.2.840.10008.1.2.4.50")
    assert wado._plan(jpeg, wado.EVLE) == [(0, 1), (1, 2)] and wado._plan(jpeg, None) == [(0, 2)]


def test_instances_read_lately_are_kept_verified_and_an_indexed_size_that_differs_stops_the_answer(tmp_path,
                                                                                                    monkeypatch):
    """viewer.instance_cache_mb: a series' metadata reads each instance from the store once, and its retrieve
    and frames after it read nothing more; without the cache every request reads the store again. The parts
    are framed as multipart by the worker. An instance whose size is not the one the index gave the answer's
    Content-Length raises (the answer is then cut short)."""
    from archive import Archive
    from viewer import wado

    archive = Archive(tmp_path / "var")
    try:
        paths = synthetic_instances(tmp_path / "in", 3, patient="Kept^One", patient_id="P-KEPT")
        for path in paths:
            assert archive.ingest_file(path).outcome.ok
        ds = pydicom.dcmread(paths[0])
        found = wado._instances(archive.index, str(ds.StudyInstanceUID), None, None)
        opened = []
        real_open = archive.storage.open
        monkeypatch.setattr(archive.storage, "open", lambda blob: opened.append(blob) or real_open(blob))

        def header(size, syntax):
            return f"<{size}>".encode()

        for kept, reads in ((None, 3 + 3 + 3), (wado.Cache(64 << 20), 3)):
            opened.clear()
            for match in found:
                wado._metadata(archive, match, wado.Cache(1 << 20), kept)
            batch, end = wado._batch(archive, found, 0, len(found), None, header, kept)
            assert end == 3 and batch.count == 3 and batch.file is None
            assert b"".join(batch.pieces) == b"".join(f"<{len(p.read_bytes())}>".encode() + p.read_bytes()
                                                      + b"\r\n" for p in paths)
            for match in found:
                wado._frames(archive, match, [1], kept)
            assert len(opened) == reads, kept
        # the attack pass: 20 parallel retrieves held every instance twice (the cache's, the framing's copy);
        # one of SEND_PIECE / 4 or more is now sent from the very buffer the cache holds
        large = synthetic_instances(tmp_path / "large", 1, pixel_bytes=wado.SEND_PIECE, patient="Kept^One",
                                    patient_id="P-KEPT")[0]
        assert archive.ingest_file(large).outcome.ok
        match, = wado._instances(archive.index, str(pydicom.dcmread(large).StudyInstanceUID), None,
                                 str(pydicom.dcmread(large).SOPInstanceUID))
        kept = wado.Cache(64 << 20)
        batch, _ = wado._batch(archive, [found[0], match, found[1]], 0, 3, None, header, kept)
        assert any(piece is kept.get((match.blob_id, match.sha256)) for piece in batch.pieces)
        assert b"".join(batch.pieces).count(large.read_bytes()) == 1
        wrong = dataclasses.replace(found[1], size=found[1].size + 1)
        batch, end = wado._batch(archive, [found[0], wrong], 0, 2, None, header, None)
        assert (end, batch.count) == (1, 1)                 # short: the batch made from there raises
        with pytest.raises(IntegrityError, match="the index says"):
            wado._batch(archive, [found[0], wrong], 1, 2, None, header, None)
    finally:
        archive.close()


def test_a_huge_sequence_is_left_out_of_metadata_in_bounded_memory(tmp_path):
    """The attack pass: a 3.9 MB top-level sequence of tiny items took a metadata request 24 s and 476 MB
    (pydicom's items are ~120 times their bytes), and prefetch made it on its own at every start. A top-level
    sequence over wado.SEQUENCE_INLINE is left out; a small one stays inline."""
    import tracemalloc

    from archive import Archive
    from viewer import wado

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5"
    ds.ReferencedImageSequence = [item] * 30000                     # ~2 MB of items
    ds.ReferencedStudySequence = [item]
    ds.save_as(tmp_path / "huge.dcm", enforce_file_format=True)
    archive = Archive(tmp_path / "var")
    try:
        assert archive.ingest_file(tmp_path / "huge.dcm").outcome.ok
        match, = wado._instances(archive.index, str(ds.StudyInstanceUID), None, str(ds.SOPInstanceUID))
        tracemalloc.start()
        kept = wado._metadata(archive, match, wado.Cache(64 << 20))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    finally:
        archive.close()
    metadata = json.loads(wado._based(kept, "https://node/dicomweb"))
    assert "00081140" not in metadata and metadata["00081110"]["Value"][0]["00081155"]["Value"] == ["1.2.3.4.5"]
    assert peak < 40 << 20, peak


# -- Orthanc's DICOMweb plug-in as a client ------------------------------------------------------------

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


@pytest.mark.skipif(not DICOMWEB_PLUGIN.exists(), reason="Debian's orthanc-dicomweb is not installed")
def test_orthanc_finds_retrieves_and_sends_back_through_dicomweb(site, pki, tmp_path):
    """Orthanc with its DICOMweb plug-in, m3dicom configured as its DICOMweb server (a write token): it
    finds a study through our QIDO-RS, retrieves it into itself through WADO-RS, sends one back by STOW-RS."""
    from test_orthanc import Orthanc

    node, url, tokens, studies, files = site
    server = {"Url": f"{url}/dicomweb/", "HttpHeaders": {"Authorization": f"Bearer {tokens['writer'].strip()}"}}
    orthanc = Orthanc(tmp_path, pki, node, free_port(), extra={
        "Plugins": [str(DICOMWEB_PLUGIN)], "HttpsCACertificates": str(pki / "ca.pem"), "HttpsVerifyPeers": True,
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": {"m3": server}}})
    try:
        found = orthanc.post("/dicom-web/servers/m3/qido", {"Uri": "/studies", "Arguments": {"PatientID": "P-JONES"}})
        assert [f["0020000D"]["Value"] for f in found] == [studies["jones"]]       # Orthanc's own JSON of our answer
        orthanc.post("/dicom-web/servers/m3/retrieve", {"Resources": [{"Study": studies["jones"]}]})
        sent = pydicom.dcmread(files["jones"][0])
        held = orthanc.sop_instance_uids()
        assert held == {sent.SOPInstanceUID}
        instance, = orthanc.get("/instances")
        retrieved = orthanc.get_bytes(f"/instances/{instance}/file")
        assert np.array_equal(pydicom.dcmread(io.BytesIO(retrieved)).pixel_array, sent.pixel_array)

        upload = pydicom.dcmread(get_testdata_file("MR_small.dcm"))            # Orthanc sends one back: STOW-RS
        buffer = io.BytesIO()
        upload.save_as(buffer, enforce_file_format=True)
        stored = orthanc.post("/instances", buffer.getvalue())
        orthanc.post("/dicom-web/servers/m3/stow", {"Resources": [stored["ID"]]})
        assert node.rows("SELECT COUNT(*) FROM instances WHERE sop_instance_uid = ?",
                         (upload.SOPInstanceUID,)) == [(1,)]
    finally:
        orthanc.stop()


def test_qido_json_is_what_pydicom_writes_of_the_c_find_match(tmp_path):
    """QIDO-RS writes DICOM JSON from the index's values (dicomweb._as_json): the same attributes and values
    as the C-FIND engine's Dataset of each match, at every level, names in UTF-8 and lists included."""
    from multidict import MultiDict

    from archive import Archive
    from archive.query import STUDY_ROOT, Query, find, find_values
    from test_query import build_studies
    from viewer.dicomweb import _as_json, identifier

    archive = Archive(tmp_path / "var")
    try:
        for entry in build_studies(tmp_path / "files").values():
            for path in entry["files"]:
                assert archive.ingest_file(path).outcome.ok
        for level in ("STUDY", "SERIES", "IMAGE"):
            ds = identifier(MultiDict([("includefield", "all")]), level, {}, None)
            query = Query(STUDY_ROOT, ds)
            raw = json.loads(_as_json(query, find_values(archive.index, query), level, "https://x/dicomweb"))
            assert all(isinstance(v, (int, float)) for r in raw for e in r.values() if e["vr"] in ("IS", "US", "UL")
                       for v in e.get("Value", []))                   # numbers as JSON numbers (PS3.18 F.2.3)
            written = [pydicom.Dataset.from_json(r) for r in raw]
            matches = list(find(archive.index, Query(STUDY_ROOT, ds)))
            assert len(written) == len(matches) > 3
            for ours, theirs in zip(written, matches):
                for element in theirs:
                    if element.keyword not in ("QueryRetrieveLevel", "SpecificCharacterSet"):
                        empty = ours[element.tag].value in (None, "", []) and element.value in (None, "", [])
                        assert empty or ours[element.tag].value == element.value, (level, element.keyword)
                assert ours.RetrieveURL.startswith(f"https://x/dicomweb/studies/{theirs.StudyInstanceUID}")
    finally:
        archive.close()
