"""Routing rules and plug-in declarations, without I/O."""
from __future__ import annotations

from pathlib import Path

import pytest

from gpu_workers.plugin import Accepts, Context, Param, ParamError, check_params, describe
from node.config import ConfigError, Rule, from_dict
from router.rules import CompiledRule, SeriesFacts

MG = "1.2.840.10008.5.1.4.1.1.1.2"
CT = "1.2.840.10008.5.1.4.1.1.2"


def facts(**overrides) -> SeriesFacts:
    values = dict(series_uid="1.2.3", modality="MG", body_part="BREAST", series_description="L CC",
                  study_description="Screening mammography", sop_classes=frozenset({MG}),
                  calling_aes=frozenset({"MAMMO1"}))
    values.update(overrides)
    return SeriesFacts(**values)


def rule(**match) -> CompiledRule:
    return CompiledRule.of(Rule(name="r", plugin="p", match=match))


@pytest.mark.parametrize("match,series,expected", [
    ({"Modality": "MG"}, facts(), True),
    ({"Modality": "MG"}, facts(modality="CT"), False),
    ({"Modality": ["CT", "MG"]}, facts(), True),
    ({"Modality": "M"}, facts(), False),                                   # exact, not a prefix
    ({"SOPClassUID": MG}, facts(), True),
    ({"SOPClassUID": CT}, facts(), False),
    ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.1x2"}, facts(), False),      # no regex without slashes
    ({"CallingAETitle": "MAMMO1"}, facts(), True),
    ({"CallingAETitle": "CT1"}, facts(), False),
    ({"StudyDescription": "/(?i).*screening.*/"}, facts(), True),
    ({"StudyDescription": "/screening/"}, facts(), False),                 # regex: whole value, case-sensitive
    ({"SeriesDescription": "/[LR] (CC|MLO)/"}, facts(), True),
    ({"BodyPartExamined": "BREAST", "Modality": "MG"}, facts(), True),    # every condition
    ({"BodyPartExamined": "BREAST", "Modality": "CT"}, facts(), False),
    ({"BodyPartExamined": ""}, facts(body_part=None), True),              # missing value matches empty
    ({}, facts(), True),
])
def test_rule_matching(match, series, expected):
    assert rule(**match).matches(series) is expected


def test_rules_select_the_series_of_a_study():
    study = [facts(series_uid="1", modality="MG"), facts(series_uid="2", modality="OT"),
             facts(series_uid="3", modality="MG")]
    assert [s.series_uid for s in rule(Modality="MG").select(study)] == ["1", "3"]


def test_the_issue_example_loads_with_its_remote():
    config = from_dict({"remote": {"PACS": {"ae_title": "PACS", "host": "pacs.example"}},
                        "router": {"rules": [{"name": "mammography", "match": {"Modality": "MG"},
                                              "plugin": "mammo-cad", "params": {}, "forward_to": ["PACS"],
                                              "quiet_seconds": 5}]}}, Path("."))
    (r,) = config.router.rules
    assert (r.name, r.plugin, r.forward_to, r.quiet_seconds) == ("mammography", "mammo-cad", ["PACS"], 5.0)


@pytest.mark.parametrize("router,key", [
    ({"rules": [{"name": "x", "plugin": "p", "match": {"Colour": "red"}}]}, "router.rules[0].match.Colour"),
    ({"rules": [{"name": "x", "plugin": "p", "match": {"Modality": "/(/"}}]}, "router.rules[0].match.Modality"),
    ({"rules": [{"name": "x", "plugin": "p", "forward_to": ["NOWHERE"]}]}, "router.rules[0].forward_to"),
    ({"rules": [{"name": "x"}]}, "router.rules[0].plugin"),
    ({"rules": [{"name": "x", "plugin": "p"}, {"name": "x", "plugin": "q"}]}, "router.rules"),
    ({"rules": [{"name": "x", "plugin": "p", "quiet": 3}]}, "router.rules[0].quiet"),
    ({"scheduler": "http://host:8786"}, "router.scheduler"),
    ({"plugins": ["no colon"]}, "router.plugins[0]"),
])
def test_bad_router_settings_name_the_key(router, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        from_dict({"router": router}, Path("."))


class _Plugin:
    name, version, title, wants_gpu = "demo", "1", "Demo", False
    accepts = Accepts(modalities=("MG",), sop_classes=(MG,))
    params = (Param("threshold", "float", 0.5, "probability", 0, 1), Param("clusters", "bool", True, "x"),
              Param("mode", "choice", "fast", "x", choices=("fast", "exact")), Param("n", "int", 3, "x", 1, 10))


def test_parameters_are_checked_against_the_schema():
    assert check_params(_Plugin, {}) == {"threshold": 0.5, "clusters": True, "mode": "fast", "n": 3}
    assert check_params(_Plugin, {"threshold": "0.25", "clusters": "false", "n": "4"})["threshold"] == 0.25
    for bad in ({"threshold": 2}, {"threshold": "nan"}, {"n": 2.5}, {"mode": "slow"}, {"colour": 1},
                {"clusters": "maybe"}):
        with pytest.raises(ParamError):
            check_params(_Plugin, bad)
    assert describe(_Plugin)["params"][0] == {"name": "threshold", "label": "Threshold", "type": "float",
                                              "default": 0.5, "help": "probability", "min": 0, "max": 1}


def test_accepts_and_result_uids_are_deterministic_per_job():
    assert _Plugin.accepts.takes("MG", [MG]) and not _Plugin.accepts.takes("CT", [CT])
    a = Context("job-1", None, None, "numpy", Path("."))
    b = Context("job-1", None, None, "numpy", Path("."))
    assert a.uid("sc", 1) == b.uid("sc", 1) != a.uid("sc", 2) != Context("job-2", None, None, "numpy", Path(".")).uid("sc", 2)
    assert a.uid("sc", 1).startswith("2.25.") and len(a.uid("sc", 1)) <= 64
