"""The viewer's audit records (`accounts.audit`) as IHE ATNA messages too, when the node keeps an audit trail
([audit] repository): logins and logouts as User Authentication, a study looked at (its page, a share link,
a model, a download, DICOMweb) as DICOM Instances Accessed, with its patient; an admin's change to an account
or a token as a Security Alert, and a search or export of the audit trail as Audit Log Used."""
from __future__ import annotations

import os

from archive import Archive
from archive.atna import Event, Participant, Patient, Study
from archive.facts import patient_of_study

ACCESSES = frozenset({"view", "share_open", "view_model", "download", "dicomweb"})
ACCOUNT_CHANGES = {   # the admin page's changes (viewer/admin.py): Security Alert of this type, "ACCOUNT: what"
    "user_add": "user-security-attributes-changed", "user_password": "user-security-attributes-changed",
    "user_role": "security-roles-changed", "user_disable": "user-security-attributes-changed",
    "user_enable": "user-security-attributes-changed", "user_sessions": "user-security-attributes-changed",
    "token_create": "user-security-attributes-changed", "token_revoke": "user-security-attributes-changed"}
AUDIT_READS = frozenset({"audit_search", "audit_export"})


def record(archive: Archive, node_ae: str, who: str | None, action: str, outcome: str, address: str | None,
           study_uid: str | None = None, detail: str = "", query: tuple[str, bytes] | None = None) -> None:
    """Record one of the viewer's audit records as an ATNA message (nothing when there is no audit trail).
    DICOMweb's (`action` "dicomweb") say by their `detail` what they were: a QIDO-RS search (Query, with
    `query`: the path and its query string), a STOW-RS (DICOM Instances Transferred, created), a WADO-RS
    (DICOM Instances Accessed)."""
    recorder = archive.audit
    if recorder is None:
        return
    node = Participant(node_ae, False, "application", alternative_id=str(os.getpid()))
    user = Participant(who or "-", True, None, address if address and address != "?" else None)
    failed = "0" if outcome == "ok" else "4"
    if action in AUDIT_READS:
        recorder.record(Event("audit-log-used", action="R", outcome=failed, participants=(user, node),
                              audit_log=detail or "/admin/audit"))
    elif action in ACCOUNT_CHANGES:
        account, _, what = detail.partition(": ")
        recorder.record(Event("security-alert", action="E", outcome=failed, event_type=ACCOUNT_CHANGES[action],
                              participants=(user, node), account=account or "-", description=what[:500] or None))
    elif action in ("login", "logout"):
        recorder.record(Event("user-authentication", action="E", outcome=failed, event_type=action,
                              participants=(user, node)))
    elif action == "dicomweb" and detail.startswith("QIDO") and query is not None:
        recorder.record(Event("query", action="E", outcome=failed, participants=(user, node), query=query))
    elif action == "dicomweb" and detail.startswith("STOW"):
        found = patient_of_study(archive.index, study_uid) if study_uid else None
        recorder.record(Event("instances-transferred", action="C", outcome=failed,
                              participants=(Participant(who or "-", True, "source", user.address),
                                            Participant(node_ae, False, "destination",
                                                        alternative_id=str(os.getpid()))),
                              studies=(Study(study_uid),) if study_uid else (),
                              patient=Patient(found[0], found[1] or None) if found else None))
    elif action in ACCESSES and study_uid:
        found = patient_of_study(archive.index, study_uid)
        patient = Patient(found[0], found[1] or None) if found else None
        recorder.record(Event("instances-accessed", action="R", outcome=failed, participants=(user, node),
                              studies=(Study(study_uid, {}, (found[2] or None) if found else None),), patient=patient))
