"""One Model per name across the managed namespaces: who owns a name that several Models claim.

The gateway's registry, the autoscaler and the ``model`` field of every request know a model by
its name alone, so with several namespaces managed (``--namespace a --namespace b``) two Models
called ``m`` would overwrite each other. The policy, the same on every gateway replica:

- the oldest Model (``metadata.creationTimestamp``) owns the name; ties (timestamps have
  one-second resolution) go to the namespace given first on the command line, then to the
  namespace name;
- a Model being deleted (``deletionTimestamp`` set) gives its claim up at once, so the next in
  line takes over while the old one is still finalizing;
- a Model claims its name whether or not its spec is valid: fixing a typo in the owner never
  hands the name to another Model and back.

The others (the losers) are not served, not scaled and get no Pods; the reconciler marks them
``Valid=False`` with reason ``NameConflict`` and records a Warning Event. ``owner_of`` is the pure
rule; ``NameOwners`` applies it to the Model informers (the watch cache, for the registry and
the autoscaler); ``fresh_owner`` applies it to a quorum read (for the reconciler, which creates
Pods and so must not act on a cache that has not seen the owner yet).
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from typing import Iterable, Mapping, Sequence

from lb_operator.kube.client import KubeApi
from lb_operator.kube.watch import Informer, Obj

CONFLICT_REASON = "NameConflict"
_NEVER = datetime.max.replace(tzinfo=timezone.utc)  # no timestamp yet: ranks after every dated one


def _meta(obj: Obj) -> Mapping[str, str]:
    return obj.get("metadata") or {}


def created_at(obj: Obj) -> datetime:
    """``creationTimestamp`` as a datetime (RFC 3339, as the API server writes it)."""
    stamp = _meta(obj).get("creationTimestamp")
    if not stamp:
        return _NEVER
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return _NEVER


def claims(obj: Obj | None) -> bool:
    """A Model holds a claim on its name until its deletion starts."""
    return obj is not None and not _meta(obj).get("deletionTimestamp")


def owner_of(claimants: Iterable[Obj], namespaces: Sequence[str]) -> Obj | None:
    """The Model that owns the name among same-named Models: oldest, then earlier in
    ``namespaces`` (the flag order), then by namespace name. Deleted ones are skipped."""
    rank = {ns: i for i, ns in enumerate(namespaces)}

    def order(obj: Obj) -> tuple[datetime, int, str]:
        namespace = _meta(obj).get("namespace", "")
        return created_at(obj), rank.get(namespace, len(rank)), namespace

    live = [obj for obj in claimants if claims(obj)]
    return min(live, key=order) if live else None


def conflict_message(name: str, owner_namespace: str) -> str:
    """What the loser's condition and Event say: who has the name and how it gets free."""
    return (f"model name {name!r} is owned by the Model in namespace {owner_namespace!r} (created "
            f"earlier, or listed first in --namespace); this Model is not served, scaled or given "
            f"Pods until that one is deleted")


class NameOwners:
    """The policy over the Model informers: ``informers`` maps each managed namespace to its
    Model informer, in flag order. Reads the informers' current items on every call (no state of
    its own to fall out of step): a handler sees the change that triggered it."""

    def __init__(self, informers: Mapping[str, Informer]) -> None:
        self.informers = dict(informers)
        self.namespaces = tuple(self.informers)

    def present(self, name: str) -> list[Obj]:
        """Every watched Model of that name, deleted ones included."""
        found = (informer.items.get(f"{ns}/{name}") for ns, informer in self.informers.items())
        return [obj for obj in found if obj is not None]

    def owner(self, name: str) -> str | None:
        """The owning Model's namespace, or None when no live Model has that name."""
        found = owner_of(self.present(name), self.namespaces)
        return None if found is None else _meta(found).get("namespace")

    def owns(self, namespace: str, name: str) -> bool:
        return self.owner(name) == namespace


async def fresh_owner(api: KubeApi, namespaces: Sequence[str], obj: Obj) -> str | None:
    """The namespace owning ``obj``'s name according to a fresh read of the same name in every
    other managed namespace (``obj`` itself was just read). One GET per other namespace; none
    when a single namespace is managed."""
    meta = _meta(obj)
    name, home = meta.get("name", ""), meta.get("namespace", "")
    others = [ns for ns in namespaces if ns != home]
    found = await asyncio.gather(*(api.get_model(ns, name) for ns in others))
    owner = owner_of([obj, *(o for o in found if o is not None)], namespaces)
    return None if owner is None else _meta(owner).get("namespace")
