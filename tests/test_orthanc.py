"""Orthanc (Debian package) as a real PACS over DICOM TLS: it queries and retrieves from the node,
and the node moves a study into it."""
from __future__ import annotations

import json
import os
import subprocess
import urllib.request

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

from helpers import free_port, wait_for
from test_query import build_studies

pytestmark = pytest.mark.interop


class Orthanc:
    def __init__(self, workdir, pki, node, dicom_port: int, extra: dict | None = None):
        """`extra`: more of Orthanc's configuration (its DICOMweb plug-in, say), over the defaults."""
        self.dicom_port, self.http_port = dicom_port, free_port()
        store = workdir / "orthanc-db"
        config = workdir / "orthanc.json"
        config.write_text(json.dumps({
            "Name": "test-pacs", "StorageDirectory": str(store), "IndexDirectory": str(store),
            "DicomAet": "ORTHANC", "DicomPort": self.dicom_port, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True, "Plugins": [], "StorageCompression": False,
            "DicomTlsEnabled": True, "DicomTlsCertificate": str(pki / "server.pem"),
            "DicomTlsPrivateKey": str(pki / "server.key"), "DicomTlsTrustedCertificates": str(pki / "ca.pem"),
            "DicomTlsRemoteCertificateRequired": True,
            "DicomModalities": {"m3": {"AET": "M3DICOM", "Host": "127.0.0.1", "Port": node.port,
                                       "UseDicomTls": True}},
            **(extra or {}),
        }))
        self.log = open(workdir / "orthanc.log", "ab")
        self.proc = subprocess.Popen(["Orthanc", str(config)], stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "TCP_NODELAY": "1"})
        wait_for(self._up, timeout=60, what="Orthanc's REST API")

    def _up(self) -> bool:
        try:
            self.get("/system")
            return True
        except OSError:
            return False

    def get(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=60) as rsp:
            return json.loads(rsp.read())

    def get_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=60) as rsp:
            return rsp.read()

    def post(self, path: str, body):
        data = body if isinstance(body, bytes) else body.encode() if isinstance(body, str) else \
            json.dumps(body).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method="POST")
        with urllib.request.urlopen(request, timeout=120) as rsp:
            return json.loads(rsp.read() or b"null")

    def sop_instance_uids(self) -> set[str]:
        return {self.get(f"/instances/{i}/simplified-tags")["SOPInstanceUID"] for i in self.get("/instances")}

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)
        self.log.close()


@pytest.fixture
def pacs(make_node, pki, tmp_path):
    """A node holding five studies, and Orthanc configured with the node as a TLS modality."""
    orthanc_port = free_port()
    node = make_node(start=False, remote={"ORTHANC": {"ae_title": "ORTHANC", "host": "127.0.0.1",
                                                      "port": orthanc_port, "server_name": "localhost"}})
    studies = build_studies(tmp_path / "files")
    orthanc = Orthanc(tmp_path, pki, node, orthanc_port)
    node.start()
    node.storescu(*[p for entry in studies.values() for p in entry["files"]])
    yield node, orthanc, studies
    orthanc.stop()


def _uids(files) -> set[str]:
    return {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}


def test_orthanc_finds_and_retrieves_a_study_over_tls(pacs):
    node, orthanc, studies = pacs
    query = orthanc.post("/modalities/m3/query", {"Level": "Study", "Query": {"PatientName": "smith*",
                                                                               "StudyDate": "", "PatientID": ""}})
    answers = orthanc.get(f"/queries/{query['ID']}/answers")
    found = {orthanc.get(f"/queries/{query['ID']}/answers/{a}/content?simplify")["PatientID"]: a for a in answers}
    assert sorted(found) == ["P1", "P2"]
    orthanc.post(f"/queries/{query['ID']}/answers/{found['P1']}/retrieve", "ORTHANC")
    wait_for(lambda: orthanc.sop_instance_uids() == _uids(studies["P1"]["files"]), timeout=60,
             what="Orthanc to hold the retrieved study")
    assert "C-MOVE from ORTHANC: 4 instances to ORTHANC" in node.log()


def test_node_moves_a_study_into_orthanc_over_tls(pacs):
    node, orthanc, studies = pacs
    assoc = node.associate("WORKSTATION", StudyRootQueryRetrieveInformationModelMove)
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = [studies["P3"]["study"], studies["P5"]["study"]]
    responses = list(assoc.send_c_move(identifier, "ORTHANC", StudyRootQueryRetrieveInformationModelMove))
    assoc.release()
    final = responses[-1][0]
    assert final.Status == 0x0000 and final.NumberOfCompletedSuboperations == 4
    assert [r[0].NumberOfRemainingSuboperations for r in responses[:-1]] == [3, 2, 1, 0]
    assert orthanc.sop_instance_uids() == _uids(studies["P3"]["files"] + studies["P5"]["files"])
