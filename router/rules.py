"""Routing rules: which series of a finished study go to which plug-in. Pure: no index, no I/O.

A rule's `match` table holds DICOM keywords and values: a plain string matches exactly, a
string written "/.../" is a regular expression that must match the whole value, and a list
matches when any of its items does. A series matches a rule when every condition holds for
it (study-level keys are the study's; SOPClassUID and CallingAETitle hold when any of the
series' instances has that value).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

from .settings import Rule


@dataclass(frozen=True)
class SeriesFacts:
    """What rules look at, for one series (result series excluded)."""
    series_uid: str
    modality: str | None
    body_part: str | None
    series_description: str | None
    study_description: str | None
    sop_classes: frozenset[str] = field(default_factory=frozenset)
    calling_aes: frozenset[str] = field(default_factory=frozenset)

    def values(self, keyword: str) -> Iterable[str]:
        single = {"Modality": self.modality, "BodyPartExamined": self.body_part,
                  "SeriesDescription": self.series_description, "StudyDescription": self.study_description}
        if keyword in single:
            return [single[keyword] or ""]
        return {"SOPClassUID": self.sop_classes, "CallingAETitle": self.calling_aes}[keyword]


@dataclass(frozen=True)
class Pattern:
    text: str
    regex: re.Pattern | None

    @classmethod
    def parse(cls, text: str) -> "Pattern":
        if len(text) > 1 and text.startswith("/") and text.endswith("/"):
            return cls(text, re.compile(text[1:-1]))
        return cls(text, None)

    def matches(self, value: str) -> bool:
        return self.regex.fullmatch(value) is not None if self.regex else value == self.text


@dataclass(frozen=True)
class CompiledRule:
    rule: Rule
    conditions: tuple[tuple[str, tuple[Pattern, ...]], ...]

    @classmethod
    def of(cls, rule: Rule) -> "CompiledRule":
        conditions = []
        for keyword, value in rule.match.items():
            items = value if isinstance(value, list) else [value]
            conditions.append((keyword, tuple(Pattern.parse(v) for v in items)))
        return cls(rule, tuple(conditions))

    @property
    def name(self) -> str:
        return self.rule.name

    def matches(self, series: SeriesFacts) -> bool:
        return all(any(p.matches(v) for p in patterns for v in series.values(keyword))
                   for keyword, patterns in self.conditions)

    def select(self, study: Iterable[SeriesFacts]) -> list[SeriesFacts]:
        """The series of the study this rule matches."""
        return [s for s in study if self.matches(s)]


def compile_rules(rules: Iterable[Rule]) -> list[CompiledRule]:
    return [CompiledRule.of(rule) for rule in rules]
