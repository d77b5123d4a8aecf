"""Kubernetes label selectors over a Model's labels.

Two users: a client's ``X-Label-Selector`` headers (KubeAI's: a client restricts which Models
match; several headers are ANDed) and an API key's ``modelSelector`` (the Models a key may use).
Supported: ``k=v``, ``k==v``, ``k!=v``, ``k in (a,b)``, ``k notin (a,b)``, ``k``, ``!k``. A
term that does not parse raises ``SelectorError``; each caller says where the selector came
from (a 400 for a header, an invalid keys file for a key).
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

Requirement = Callable[[Mapping[str, str]], bool]

_SET = re.compile(r"^\s*(!?)\s*([A-Za-z0-9._/-]+)\s*(?:(in|notin)\s*\(([^)]*)\))?\s*$")
_EQ = re.compile(r"^\s*([A-Za-z0-9._/-]+)\s*(==|=|!=)\s*([A-Za-z0-9._-]*)\s*$")


class SelectorError(ValueError):
    """A selector that does not parse; the message names the bad term."""


_SPACES = re.compile(r"\s+")


def parse_selector(text: str) -> list[Requirement]:
    """Parse one selector string; raises ``SelectorError`` naming the bad term. Whitespace runs
    are collapsed first: the term regexes backtrack quadratically on long runs of spaces (20 KB
    of them in a header held the event loop for seconds), and no selector token contains
    whitespace, so nothing else changes."""
    return [_requirement(term) for term in _terms(_SPACES.sub(" ", text)) if term.strip()]


def matches(requirements: list[Requirement], labels: Mapping[str, str]) -> bool:
    """Whether ``labels`` meet every requirement (an empty selector matches everything)."""
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
        raise SelectorError(f"invalid label selector term {term.strip()!r}")
    negate, key, op, values = found.groups()
    if op is None:
        return (lambda labels: key not in labels) if negate else (lambda labels: key in labels)
    if negate:
        raise SelectorError(f"invalid label selector term {term.strip()!r}")
    allowed = frozenset(v.strip() for v in values.split(",") if v.strip())
    if op == "in":
        return lambda labels: labels.get(key) in allowed
    return lambda labels: labels.get(key) not in allowed
