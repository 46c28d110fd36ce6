"""Jobs made and cancelled by people (the viewer, the command line), with the rules' checks."""
from __future__ import annotations

import time

from archive.index import Index
from archive.inputs import study_series
from gpu_workers.plugin import ParamError, Plugin, check_params

from . import queue
from .jobs import Cancel


class JobRequestError(ValueError):
    """The job cannot be made as asked (unknown plug-in or study, bad parameters, no input it takes)."""


def plugins_for_study(index: Index, plugins: dict[str, Plugin], study_uid: str) -> dict[str, list[str]]:
    """Plug-in name -> the series of the study it takes (only plug-ins that take some)."""
    series = study_series(index, study_uid)
    found = {}
    for name, plugin in plugins.items():
        taken = [s.series_uid for s in series if plugin.accepts.takes(s.modality, sorted(s.sop_classes))]
        if taken:
            found[name] = taken
    return found


def request_job(index: Index, plugins: dict[str, Plugin], *, study_uid: str, plugin: str, params: dict,
                series: list[str] | None = None, created_by: str, max_attempts: int = 3) -> list[str]:
    """Queue jobs of `plugin` on the study (its series the plug-in takes, or `series`); their ids."""
    if plugin not in plugins:
        raise JobRequestError(f"no plug-in named {plugin!r}")
    try:
        checked = check_params(plugins[plugin], params)
    except ParamError as exc:
        raise JobRequestError(str(exc)) from None
    takes = plugins_for_study(index, plugins, study_uid).get(plugin, [])
    chosen = series or takes
    if not chosen or any(s not in takes for s in chosen):
        raise JobRequestError(f"{plugin} takes no{'ne of these' if series else ''} series of study {study_uid}")
    groups = [chosen] if plugins[plugin].accepts.per == "study" else [[s] for s in chosen]
    now = time.time()
    with index.write() as conn:
        return [queue.create(index, study_uid=study_uid, plugin=plugin, params=checked, inputs=group,
                             created_by=created_by, max_attempts=max_attempts, now=now, conn=conn) for group in groups]


def cancel(index: Index, job_id: str, now: float | None = None) -> queue.JobRecord:
    """Cancel a queued or running job (IllegalTransition when it has ended)."""
    return queue.apply(index, job_id, Cancel(time.time() if now is None else now))
