"""Run a plug-in on files, without a node (`m3dicom plugin run`): results written to a folder."""
from __future__ import annotations

import hashlib
import json
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Callable

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from .backend import array_module
from .plugin import Algorithm, Context, Instance, Plugin, PluginError, Series, check_params
from .results import encode


def series_of(paths: list[Path]) -> list[Series]:
    """DICOM files grouped by series (non-DICOM files refused by name)."""
    grouped: dict[str, list[tuple]] = defaultdict(list)
    modality: dict[str, str | None] = {}
    for path in paths:
        try:
            ds = dcmread(path, stop_before_pixels=True)
            key = str(ds.SeriesInstanceUID)
            grouped[key].append((int(ds.get("InstanceNumber") or 0), Instance(str(ds.SOPInstanceUID),
                                                                               str(ds.SOPClassUID), path)))
            modality[key] = ds.get("Modality")
        except (InvalidDicomError, AttributeError, OSError) as exc:
            raise PluginError(f"{path}: not a DICOM instance ({exc.__class__.__name__})") from None
    return [Series(uid, modality[uid], tuple(i for _, i in sorted(items, key=lambda t: t[0])))
            for uid, items in grouped.items()]


def run_local(plugin: Plugin, paths: list[Path], params: dict, out: Path,
              progress: Callable[[float, str], None] = lambda f, m="": None) -> dict:
    """Run `plugin` on `paths`; write its DICOM objects, files and summary.json into `out`."""
    params = check_params(plugin, params)
    series = series_of(paths)
    accepted = [s for s in series if plugin.accepts.takes(s.modality, [i.sop_class_uid for i in s.instances])]
    if not accepted:
        raise PluginError(f"{plugin.name} takes none of these files (it takes: "
                          f"{', '.join(plugin.accepts.modalities) or 'any modality'})")
    key = json.dumps([plugin.name, plugin.version, params, sorted(i.sop_instance_uid for s in accepted
                                                                   for i in s.instances)], sort_keys=True)
    xp, backend = array_module()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        ctx = Context("local-" + hashlib.sha256(key.encode()).hexdigest()[:16],
                      Algorithm(plugin.name, plugin.version, params), xp, backend, Path(work), progress)
        result = plugin.run(accepted, params, ctx)
    written = []
    for dataset in result.datasets:
        name = f"{dataset.Modality.lower()}-{dataset.SeriesNumber}-{dataset.InstanceNumber}.dcm"
        (out / name).write_bytes(encode(dataset))
        written.append(name)
    for item in result.files:
        (out / Path(item.name).name).write_bytes(item.data)
        written.append(Path(item.name).name)
    summary = {**result.summary, "backend": backend, "written": written}
    (out / "summary.json").write_text(json.dumps(result.summary, indent=2))
    return summary
