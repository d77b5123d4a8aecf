"""Kubernetes label selectors, as sent in ``X-Label-Selector`` headers.

KubeAI lets a client restrict which Models match (e.g. per tenant); several headers are ANDed.
Supported: ``k=v``, ``k==v``, ``k!=v``, ``k in (a,b)``, ``k notin (a,b)``, ``k``, ``!k``.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

from lb.errors import bad_request

Requirement = Callable[[Mapping[str, str]], bool]

_SET = re.compile(r"^\s*(!?)\s*([A-Za-z0-9._/-]+)\s*(?:(in|notin)\s*\(([^)]*)\))?\s*$")
_EQ = re.compile(r"^\s*([A-Za-z0-9._/-]+)\s*(==|=|!=)\s*([A-Za-z0-9._-]*)\s*$")


def parse_selector(text: str) -> list[Requirement]:
    """Parse one selector string; raises a 400 GatewayError naming the bad term."""
    return [_requirement(term) for term in _terms(text) if term.strip()]


def matches(requirements: list[Requirement], labels: Mapping[str, str]) -> bool:
    return all(req(labels) for req in requirements)


def _terms(text: str) -> list[str]:
    """Split at commas that are not inside ``( )``."""
    terms, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            terms.append(text[start:i])
            start = i + 1
    terms.append(text[start:])
    return terms


def _requirement(term: str) -> Requirement:
    eq = _EQ.match(term)
    if eq:
        key, op, value = eq.groups()
        if op == "!=":
            return lambda labels: labels.get(key) != value
        return lambda labels: labels.get(key) == value
    found = _SET.match(term)
    if not found:
        raise bad_request(f"invalid X-Label-Selector term {term.strip()!r}")
    negate, key, op, values = found.groups()
    if op is None:
        return (lambda labels: key not in labels) if negate else (lambda labels: key in labels)
    if negate:
        raise bad_request(f"invalid X-Label-Selector term {term.strip()!r}")
    allowed = frozenset(v.strip() for v in values.split(",") if v.strip())
    if op == "in":
        return lambda labels: labels.get(key) in allowed
    return lambda labels: labels.get(key) not in allowed
