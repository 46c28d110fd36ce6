"""What the study page says about analyses: each image's state, failure reasons in plain words,
a structured report's findings as a table, and labels that tell series apart.

A reader must never take "the analysis has not run" or "it failed" for "it found nothing": each
image of a series an analysis plug-in takes gets one of these states, from the newest job of that
plug-in on the image's series:

    not-run        no job yet (or only cancelled ones)
    queued         waiting for a worker
    running        a worker is on it (progress and its message)
    nothing-found  it succeeded and says this image has no finding (findings.json images[].outcome)
    found          it succeeded with findings on this image
    done           it succeeded, without an outcome per image (a 3D model, say)
    failed         it failed: the reason for people, the technical text apart

Pure functions over what `router.queue` returns and pydicom data sets; nothing here knows HTTP
or SQL.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from pydicom.sequence import Sequence

NOTHING_FOUND_OUTCOMES = ("no cluster found", "nothing found", "no finding", "no findings")
_ATTEMPT = re.compile(r"^attempt \d+: ")
_EXCEPTION = re.compile(r"^([A-Z][A-Za-z0-9_]*(?:Error|Exception|Warning|Exit|Interrupt)): (.*)$", re.S)
_TIMED_OUT = re.compile(r"^timed out after (\d+) s")
PLAIN_EXCEPTIONS = ("PluginError", "ParamError")     # their messages are written for people
MAX_FINDINGS = 500                                    # rows of one report's findings table


# -- failures in plain words ---------------------------------------------------------------------

def plain_reason(error: str) -> tuple[str, str]:
    """(what a reader is told, the technical text) for one entry of `jobs.errors`."""
    technical = _ATTEMPT.sub("", error or "").strip()
    exception = _EXCEPTION.match(technical)
    if exception and exception.group(1) in PLAIN_EXCEPTIONS:
        return exception.group(2).strip(), technical
    if exception:
        return ("the analysis stopped on an error of its own, not because of the image; tell your administrator "
                "(the job's details say where)"), technical
    if technical.startswith("lease expired"):
        return "the computer running it stopped answering", technical
    timed_out = _TIMED_OUT.match(technical)
    if timed_out:
        return f"it took longer than the {timed_out.group(1)} seconds it is allowed (router.job_timeout)", technical
    if technical.startswith("results not stored"):
        return "its results could not be stored; tell your administrator", technical
    if technical.startswith("the task was"):
        return "its task was stopped before it finished", technical
    return technical or "no reason was recorded", technical


# -- each image's state --------------------------------------------------------------------------

def image_states(series: Iterable[Mapping], takes: Mapping[str, Iterable[str]], jobs: Iterable,
                 outcomes: Mapping[str, Mapping[str, dict]], titles: Mapping[str, str]) -> dict[str, list[dict]]:
    """{SOP Instance UID: [state of each plug-in that takes or analysed its series]} for the source
    images of the study.

    `series`: the study's series ({series_uid, result, instances: [{sop_instance_uid}]});
    `takes`: {plug-in: series UIDs it takes}; `jobs`: the study's jobs, newest first (JobRecords);
    `outcomes`: {job id: {SOP Instance UID: findings.json images[] entry}} of succeeded jobs;
    `titles`: {plug-in: its title}.
    """
    jobs = list(jobs)
    out: dict[str, list[dict]] = {}
    for one in series:
        if one.get("result"):
            continue
        uid = one["series_uid"]
        plugins = [p for p, taken in takes.items() if uid in set(taken)]
        plugins += sorted({j.plugin for j in jobs if uid in j.inputs and j.plugin not in plugins})
        for plugin in plugins:
            newest = next((j for j in jobs if j.plugin == plugin and uid in j.inputs and j.state != "cancelled"), None)
            for instance in one["instances"]:
                state = _state(plugin, titles.get(plugin, plugin), newest, outcomes, instance["sop_instance_uid"])
                out.setdefault(instance["sop_instance_uid"], []).append(state)
    return out


def _state(plugin: str, title: str, job, outcomes: Mapping[str, Mapping[str, dict]], image_uid: str) -> dict:
    state = {"plugin": plugin, "title": title, "job_id": job.id if job else None}
    if job is None:
        return {**state, "state": "not-run", "text": f"{title}: not run on this image yet"}
    if job.state == "queued":
        waiting = f" (attempt {job.attempts + 1} of {job.max_attempts})" if job.attempts else ""
        return {**state, "state": "queued", "text": f"{title}: waiting to run{waiting}"}
    if job.state == "running":
        return {**state, "state": "running", "progress": job.progress or 0.0, "message": job.progress_message or "",
                "text": f"{title}: running, {round(100 * (job.progress or 0))}%"}
    if job.state == "failed":
        reason, technical = plain_reason(job.errors[-1] if job.errors else "")
        tries = f" after {job.attempts} attempts" if job.attempts > 1 else ""
        return {**state, "state": "failed", "reason": reason, "technical": technical,
                "text": f"{title} failed{tries}: {reason}"}
    image = outcomes.get(job.id, {}).get(image_uid)
    if image is None:
        if outcomes.get(job.id):                 # the job gave outcomes per image, but none for this one
            return {**state, "state": "not-run", "text": f"{title}: this image was not analysed"}
        return {**state, "state": "done", "text": f"{title}: done"}
    outcome = str(image.get("outcome", ""))
    if outcome in NOTHING_FOUND_OUTCOMES:
        return {**state, "state": "nothing-found", "outcome": outcome,
                "text": f"{title} ran and found nothing on this image ({outcome})"}
    count = image.get("clusters")
    return {**state, "state": "found", "outcome": outcome, "clusters": count,
            "text": f"{title}: {outcome}" + (f" ({count})" if isinstance(count, int) else "")}


def study_verdict(jobs: Iterable[Mapping]) -> dict[str, int]:
    """What the study list's Analysis badges say of one study: of the newest job of each plug-in on
    each set of series (cancelled ones left out), how many found something ("findings"), found
    nothing ("nothing-found"), finished without saying either (a 3D model: "done"), failed, run or
    wait. `jobs`: {plugin, inputs (JSON text or list), state, summary (JSON text, dict or None)},
    newest first."""
    import json

    seen: set[tuple[str, str]] = set()
    out: dict[str, int] = {}
    for job in jobs:
        if job["state"] == "cancelled":
            continue
        inputs = job["inputs"] if isinstance(job["inputs"], str) else json.dumps(sorted(job["inputs"] or []))
        key = (job["plugin"], inputs)
        if key in seen:
            continue
        seen.add(key)
        state = job["state"]
        if state == "succeeded":
            summary = job.get("summary")
            if isinstance(summary, str):
                try:
                    summary = json.loads(summary)
                except ValueError:
                    summary = None
            outcome = str(summary.get("outcome", "")) if isinstance(summary, Mapping) else ""
            state = "nothing-found" if outcome in NOTHING_FOUND_OUTCOMES else "findings" if outcome else "done"
        out[state] = out.get(state, 0) + 1
    return out


def outcomes_of(findings: Mapping) -> dict[str, dict]:
    """{SOP Instance UID: its entry} of a findings.json `images` list (a job's outcome per image)."""
    images = findings.get("images") if isinstance(findings, Mapping) else None
    return {str(i["sop_instance_uid"]): dict(i) for i in images or []
            if isinstance(i, Mapping) and i.get("sop_instance_uid")}


# -- series labels --------------------------------------------------------------------------------

PROJECTION_MODALITIES = ("MG",)      # one view per image, several views possibly in one series
CROSS_SECTIONAL_MODALITIES = ("CT", "MR", "PT", "NM")    # their edges are named from Image Orientation (Patient)


def image_orientation(ds) -> list[float] | None:
    """Image Orientation (Patient): the row's and the column's direction cosines (six numbers), or
    None when absent or not six finite numbers (the page then names no edge)."""
    try:
        values = [float(v) for v in ds.get("ImageOrientationPatient") or []]
    except (TypeError, ValueError):
        return None
    if len(values) != 6 or any(v != v or abs(v) > 1.0001 for v in values):
        return None
    return [round(v, 6) for v in values]
RESULT_KINDS = {"1.2.840.10008.5.1.4.1.1.7": "marked image", "1.2.840.10008.5.1.4.1.1.88.34": "report",
                "1.2.840.10008.5.1.4.1.1.88.33": "report", "1.2.840.10008.5.1.4.1.1.88.22": "report",
                "1.2.840.10008.5.1.4.1.1.88.11": "report", "1.2.840.10008.5.1.4.1.1.104.3": "3D model",
                "1.2.840.10008.5.1.4.1.1.11.1": "presentation state"}


_VIEW_KIND = re.compile(r"^[^:]{1,40}:\s*(\w[\w -]{0,30} view)$", re.I)      # "Bone model: front view"


def result_kind(sop_class_uid: str, description: str | None) -> str:
    """What a result object is, for its series' label: "report", "3D model", "marked image"; a
    rendered view that its series description names ("Bone model: front view") is that view."""
    kind = RESULT_KINDS.get(sop_class_uid, "result")
    named = _VIEW_KIND.match((description or "").strip())
    if kind == "marked image" and named:
        return named.group(1).lower()
    return kind


def measured(value, unit: str) -> str:
    """A NUM content item's value as people read it: "3" (not "3.0 1": UCUM's "1" is no unit),
    "85.2%", "12.5 mm", "194 mm²"; UCUM annotations ("{calcifications}") are left out."""
    text = str(value).strip()
    try:
        number = float(text)
        text = f"{number:.6f}".rstrip("0").rstrip(".") if number == number and abs(number) < 1e15 else text
    except ValueError:
        pass
    unit = re.sub(r"\{[^}]*\}", "", str(unit or "")).strip()
    unit = {"1": "", "mm2": "mm²", "cm2": "cm²", "mm3": "mm³", "cm3": "cm³", "[hnsf'U]": "HU"}.get(unit, unit)
    if not unit:
        return text
    return f"{text}{unit}" if unit == "%" else f"{text} {unit}"


def source_label(series: Mapping, facts: Mapping | None) -> str:
    """"MG R CC" for a mammogram; "CT 2" (modality, series number) otherwise."""
    modality = series.get("modality") or "?"
    if facts and (facts.get("laterality") or facts.get("view")):
        return " ".join(part for part in (modality, facts.get("laterality"), facts.get("view")) if part)
    return f"{modality} {series['number']}" if series.get("number") is not None else modality


def label_series(series: list[dict], facts: Mapping[str, Mapping], job_inputs: Mapping[str, list[str]],
                 plugin_of: Mapping[str, str]) -> None:
    """Give each series a `label` that tells it apart, and each result series the label of the
    series it was made from (`source`) and the plug-in that made it.

    `facts`: {series UID: Images.facts of its first image}; `job_inputs`: {job id: series UIDs};
    `plugin_of`: {job id: plug-in}.
    """
    by_uid = {}
    for one in series:
        if not one.get("result"):
            one["label"] = source_label(one, facts.get(one["series_uid"]))
            one.update({k: facts[one["series_uid"]].get(k, "") for k in ("laterality", "view", "orientation")}
                       if one["series_uid"] in facts else {})
            views = []
            for instance in one["instances"]:         # images that say their own view (mammograms)
                if instance.get("laterality") or instance.get("view"):
                    instance["label"] = source_label(one, instance)
                    views.append(instance["label"].split(" ", 1)[-1])
            views = list(dict.fromkeys(views))
            if len(views) > 1:                        # several views in one series: name them all
                one["label"] = f"{one.get('modality') or '?'} " + (", ".join(views) if len(views) <= 4
                                                                   else f"{len(views)} views")
            by_uid[one["series_uid"]] = one["label"]
    seen: dict[str, int] = {}
    for one in series:
        if not one.get("result"):
            seen[one["label"]] = seen.get(one["label"], 0) + 1
    for one in series:                       # the same label twice: the series number tells them apart
        if not one.get("result") and seen[one["label"]] > 1 and one.get("number") is not None:
            one["label"] = f"{one['label']} (series {one['number']})"
            by_uid[one["series_uid"]] = one["label"]
    for one in series:
        if not one.get("result"):
            continue
        jobs = [i["job_id"] for i in one["instances"] if i.get("job_id")]
        job = jobs[0] if jobs else None
        kinds = {result_kind(i["sop_class_uid"], one.get("description")) for i in one["instances"]}
        kind = kinds.pop() if len(kinds) == 1 else "results"
        sources = [by_uid[s] for s in job_inputs.get(job, []) if s in by_uid]
        one["plugin"] = plugin_of.get(job, "")
        one["source"] = ", ".join(sources)
        one["label"] = f"{one['plugin'] or 'analysis'} {kind}"


# -- a structured report's findings ---------------------------------------------------------------

_CODE = {"imaging_measurements": "126010", "measurement_group": "125007", "tracking_id": "112039",
         "finding": "121071", "algorithm_name": "111001", "algorithm_version": "111003",
         "algorithm_parameters": "111002", "image_region": "111030", "source": "260753009",
         "count": "111038", "certainty": "111012"}


def _code(item, keyword: str = "ConceptNameCodeSequence") -> tuple[str, str]:
    sequence = item.get(keyword)
    if not isinstance(sequence, Sequence) or not len(sequence):
        return "", ""
    return str(sequence[0].get("CodeValue", "")), str(sequence[0].get("CodeMeaning", ""))


def _children(item) -> list:
    sequence = item.get("ContentSequence")
    return list(sequence) if isinstance(sequence, Sequence) else []


def _number(item) -> tuple[float | None, str]:
    measured = item.get("MeasuredValueSequence")
    if not isinstance(measured, Sequence) or not len(measured):
        return None, ""
    try:
        value = float(measured[0].get("NumericValue"))
    except (TypeError, ValueError):
        return None, ""
    return value, _code(measured[0], "MeasurementUnitsCodeSequence")[0]


def _referenced_image(item) -> str | None:
    for child in [item, *_children(item)]:
        if str(child.get("ValueType", "")) == "IMAGE":
            refs = child.get("ReferencedSOPSequence")
            if isinstance(refs, Sequence) and len(refs):
                return str(refs[0].get("ReferencedSOPInstanceUID", "")) or None
    return None


def _region(item) -> dict | None:
    kind = str(item.get("GraphicType", ""))
    try:
        data = [float(v) for v in (item.get("GraphicData") or [])][:64]
    except (TypeError, ValueError):
        return None
    points = [data[i:i + 2] for i in range(0, len(data) - 1, 2)]
    if not points:
        return None
    # SCOORD coordinates put 0,0 at the top left corner of the first pixel: a pixel's centre is +0.5
    if kind == "CIRCLE" and len(points) >= 2:
        (cx, cy), (ex, ey) = points[0], points[1]
        centre, radius = (cx - 0.5, cy - 0.5), ((ex - cx) ** 2 + (ey - cy) ** 2) ** 0.5
    else:
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        centre = (sum(xs) / len(xs) - 0.5, sum(ys) / len(ys) - 0.5)
        radius = max(max(xs) - min(xs), max(ys) - min(ys)) / 2
    return {"type": kind, "x": round(centre[0], 1), "y": round(centre[1], 1), "radius": round(radius, 1)}


def report_findings(ds) -> dict:
    """A TID 1500 measurement report's groups as table rows: id, finding, number of calcifications,
    score (certainty, %), where (the region on its image), what was found absent; and the algorithm."""
    rows: list[dict] = []
    algorithm: dict = {}
    for container in _children(ds):
        if _code(container)[0] != _CODE["imaging_measurements"]:
            continue
        for group in _children(container):
            if len(rows) >= MAX_FINDINGS:
                break
            if str(group.get("ValueType", "")) != "CONTAINER":
                continue
            rows.append(_group(group, algorithm))
    return {"findings": rows, "algorithm": algorithm or None}


def _group(group, algorithm: dict) -> dict:
    row: dict = {"id": "", "finding": "", "calcifications": None, "score": None, "region": None, "image": None,
                 "absent": [], "measurements": []}
    parameters = []
    for item in _children(group):
        code, meaning = _code(item)
        kind = str(item.get("ValueType", ""))
        if code == _CODE["tracking_id"] and kind == "TEXT":
            row["id"] = str(item.get("TextValue", ""))
        elif code == _CODE["finding"] and kind == "CODE":
            row["finding"] = _code(item, "ConceptCodeSequence")[1]
        elif code == _CODE["algorithm_name"]:
            algorithm.setdefault("name", str(item.get("TextValue", "")))
        elif code == _CODE["algorithm_version"]:
            algorithm.setdefault("version", str(item.get("TextValue", "")))
        elif code == _CODE["algorithm_parameters"]:
            parameters.append(str(item.get("TextValue", "")))
        elif kind == "NUM":
            value, unit = _number(item)
            if code == _CODE["count"] and value is not None:
                row["calcifications"] = int(round(value))
            elif code == _CODE["certainty"] and value is not None:
                row["score"] = value
            elif value is not None:
                row["measurements"].append({"name": meaning, "value": value, "unit": unit})
        elif kind == "SCOORD" and row["region"] is None:
            row["region"] = _region(item)
            row["image"] = _referenced_image(item) or row["image"]
        elif kind == "IMAGE":
            row["image"] = row["image"] or _referenced_image(item)
        elif kind == "CODE":
            value = _code(item, "ConceptCodeSequence")[1]
            if value.lower() == "absent":
                row["absent"].append(meaning)
            else:
                row["measurements"].append({"name": meaning, "value": value, "unit": ""})
    if parameters and "parameters" not in algorithm:
        algorithm["parameters"] = parameters
    return row
