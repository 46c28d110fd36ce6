"""What an analysis plug-in is: its declaration, what it receives and what it returns.

A plug-in is a class (or an instance) with `name`, `version`, `title`, `accepts`,
`params`, `wants_gpu` and `run(inputs, params, ctx) -> Result`. Installed plug-ins are found
through the entry-point group `m3dicom.plugins` (`pip install` a package that declares one);
`router.plugins` adds "module:attribute" ones. The same registry is used by the node (to
route and to validate parameters), by the Dask workers (to run) and by the viewer (to draw
a form from each parameter schema). Nothing here touches the network or the index.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import math
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from pydicom.dataset import Dataset

from archive.dicomfile import DEFAULT_LIMITS, InvalidInstance, Limits, read_dataset

ENTRY_POINT_GROUP = "m3dicom.plugins"
PARAM_TYPES = ("float", "int", "bool", "choice", "str")


class ParamError(ValueError):
    """A parameter value is unknown, of the wrong type or out of its range."""


class PluginError(Exception):
    """The plug-in cannot work on these inputs (a clear message for the job; not retried)."""


@dataclass(frozen=True)
class Param:
    name: str
    type: str                          # float | int | bool | choice | str
    default: Any
    help: str
    min: float | None = None
    max: float | None = None
    choices: tuple = ()
    unit: str = ""
    label: str = ""                    # what a form calls it ("False positives per image"); default: from name

    @property
    def title(self) -> str:
        name = self.name
        if self.unit and name.lower().endswith("_" + self.unit.lower()):    # smoothing_mm (mm): "Smoothing"
            name = name[:-len(self.unit) - 1]
        return self.label or name.replace("_", " ").capitalize()

    def coerce(self, value: Any) -> Any:
        """The value as this parameter's type, checked against its range or choices."""
        if self.type == "bool":
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            if not isinstance(value, bool):
                raise ParamError(f"{self.name}: expected true or false, got {value!r}")
            return value
        if self.type in ("int", "float"):
            try:
                number = int(value) if self.type == "int" and not isinstance(value, float) else float(value)
            except (TypeError, ValueError):
                raise ParamError(f"{self.name}: expected a number, got {value!r}") from None
            if isinstance(value, bool) or (isinstance(number, float) and not math.isfinite(number)):
                raise ParamError(f"{self.name}: expected a number, got {value!r}")
            if self.type == "int" and number != int(number):
                raise ParamError(f"{self.name}: expected a whole number, got {value!r}")
            number = int(number) if self.type == "int" else number
            if (self.min is not None and number < self.min) or (self.max is not None and number > self.max):
                raise ParamError(f"{self.name}: {number} is outside {self.min}..{self.max}")
            return number
        if self.type == "choice":
            if value not in self.choices:
                raise ParamError(f"{self.name}: {value!r} is not one of {', '.join(map(str, self.choices))}")
            return value
        if not isinstance(value, str) or len(value) > 256:
            raise ParamError(f"{self.name}: expected a short text")
        return value

    def schema(self) -> dict:
        """JSON for a form field (the viewer draws one from it)."""
        item = {"name": self.name, "label": self.title, "type": self.type, "default": self.default, "help": self.help}
        item.update({k: v for k, v in (("min", self.min), ("max", self.max), ("unit", self.unit)) if v not in (None, "")})
        if self.choices:
            item["choices"] = list(self.choices)
        return item


@dataclass(frozen=True)
class Accepts:
    """Which inputs a plug-in takes: modalities and SOP classes (empty = any), per series or per study."""
    modalities: tuple[str, ...] = ()
    sop_classes: tuple[str, ...] = ()
    per: str = "series"                # series: one job per matching series; study: one job for them all

    def takes(self, modality: str | None, sop_classes: Sequence[str]) -> bool:
        if self.modalities and (modality or "") not in self.modalities:
            return False
        return not self.sop_classes or any(c in self.sop_classes for c in sop_classes)


@dataclass(frozen=True)
class Instance:
    sop_instance_uid: str
    sop_class_uid: str
    path: Path                         # the decrypted Part 10 file, verified against its SHA-256
    limits: Limits = field(default=DEFAULT_LIMITS, compare=False)   # the node's [ingest] limits

    def dataset(self, pixels: bool = True) -> Dataset:
        """The data set, read within the node's limits: with `pixels`, one whose declared pixel data
        (or a compressed frame's header) is over `ingest.max_pixel_bytes` fails the job at once
        (`PluginError`) before anything decodes it; so does a deflate bomb or too deep a nesting."""
        try:
            return read_dataset(self.path, self.limits, pixels=pixels)
        except InvalidInstance as exc:
            raise PluginError(f"instance {self.sop_instance_uid}: {exc}") from None


@dataclass(frozen=True)
class Series:
    series_uid: str
    modality: str | None
    instances: tuple[Instance, ...]


@dataclass(frozen=True)
class OutputFile:
    name: str                          # e.g. "model.x3d", "findings.json"
    media_type: str
    data: bytes


@dataclass
class Result:
    datasets: list[Dataset] = field(default_factory=list)   # DICOM objects for the source study
    files: list[OutputFile] = field(default_factory=list)    # anything else (X3D, JSON)
    summary: dict = field(default_factory=dict)             # JSON, shown with the job


@dataclass(frozen=True)
class Algorithm:
    """How results name what made them (DICOM Algorithm Identification, the SR's observer)."""
    name: str
    version: str
    params: dict

    @property
    def parameters_text(self) -> str:
        return json.dumps(self.params, sort_keys=True)[:1024]


@dataclass
class Context:
    job_id: str
    algorithm: Algorithm
    xp: Any                            # cupy when a CUDA device is there, else numpy
    backend: str                       # "cupy" | "numpy"
    workdir: Path
    progress: Callable[[float, str], None] = lambda fraction, message="": None
    predecessors: tuple[dict, ...] = ()   # results of the job this one supersedes: {sop_class_uid, sop_instance_uid, series_uid, study_uid}

    def uid(self, *parts: Any) -> str:
        """A UID that is the same every time this job makes this object (a re-run after a
        crash stores nothing twice): 2.25 + a number derived from the job id and `parts`."""
        digest = hashlib.sha256("\x00".join(map(str, (self.job_id, *parts))).encode()).digest()
        return f"2.25.{int.from_bytes(digest[:16], 'big')}"


class Plugin(Protocol):
    name: str
    version: str
    title: str
    accepts: Accepts
    params: tuple[Param, ...]
    wants_gpu: bool

    def run(self, inputs: list[Series], params: dict, ctx: Context) -> Result: ...


def check_params(plugin: Plugin, given: dict) -> dict:
    """Every parameter of the plug-in: the given value checked, or its default."""
    known = {p.name: p for p in plugin.params}
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ParamError(f"{plugin.name} has no parameter {unknown[0]!r} (it has: {', '.join(known) or 'none'})")
    return {name: p.coerce(given[name]) if name in given else p.default for name, p in known.items()}


def describe(plugin: Plugin) -> dict:
    """The plug-in's declaration as JSON (the viewer's form, `m3dicom plugin list`)."""
    return {"name": plugin.name, "version": plugin.version, "title": plugin.title,
            "accepts": {"modalities": list(plugin.accepts.modalities), "sop_classes": list(plugin.accepts.sop_classes),
                        "per": plugin.accepts.per},
            "wants_gpu": plugin.wants_gpu, "params": [p.schema() for p in plugin.params]}


def _load(reference: str) -> Plugin:
    module, _, attribute = reference.partition(":")
    target = importlib.import_module(module)
    for part in attribute.split("."):
        target = getattr(target, part)
    return target() if isinstance(target, type) else target


def discover(extra: Sequence[str] = ()) -> dict[str, Plugin]:
    """The plug-ins by name: installed entry points, then `extra` ("module:attribute")."""
    found: dict[str, Plugin] = {}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        found_plugin = _load(entry.value)
        found[found_plugin.name] = found_plugin
    for reference in extra:
        try:
            found_plugin = _load(reference)
        except (ImportError, AttributeError) as exc:
            raise PluginError(f"router.plugins: cannot load {reference!r}: {exc}") from None
        found[found_plugin.name] = found_plugin
    return found
