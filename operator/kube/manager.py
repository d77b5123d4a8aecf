"""The cluster operator of one gateway replica: informers, leader election, reconciler, extensions.

Every replica of the deployment runs the same thing (`kvgate serve` puts it beside the gateway):
Model and Pod informers per managed namespace feeding its own gateway's registry
(`lb_operator.kube.endpoints`), a `ClusterScaler` for scale-from-zero, and a Lease campaign
(`lb_operator.kube.leader`); the replica holding the Lease also runs the reconciler (with each
Model's cache step, `lb_operator.kube.cache`, and cache-Job informers to notice loads
finishing), LoRA adapter loading (`lb_operator.kube.adapters`) and the autoscaler
(`lb_operator.kube.autoscaling`: it scrapes the Pods ``--gateway-selector`` matches in the first
namespace, and keeps its state in a ConfigMap there).

``ClusterOperator`` is that composition, usable on its own (the tests run two of them against
one API server). Namespace-scoped like KubeAI: ``ClusterOptions.namespaces``, with the Lease in
the first; a Model name claimed in several of them belongs to one Model
(`lb_operator.kube.names`), the only one served, reconciled into Pods and autoscaled.
"""

from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import aiohttp
from prometheus_client import CollectorRegistry

from lb.model import GROUP, PLURAL, VERSION
from lb.registry import Registry
from lb_operator.autoscaler import Autoscaler
from lb_operator.kube.adapters import ClusterAdapters
from lb_operator.kube.autoscaling import (DEFAULT_GATEWAY_SELECTOR, ConfigMapStateStore,
                                          GatewayTargets, ScaleByName, watched_models)
from lb_operator.kube.client import KubeApi
from lb_operator.kube.endpoints import EndpointSync
from lb_operator.kube.events import EventRecorder
from lb_operator.kube.leader import DEFAULT_LEASE_NAME, LeaderElector, LeaderTask
from lb_operator.kube.names import NameOwners
from lb_operator.kube.reconciler import JOB_SELECTOR, POD_SELECTOR, ReconcileHook, Reconciler
from lb_operator.kube.scaler import ClusterScaler
from lb_operator.kube.watch import Informer
from lb_operator.retry import Backoff
from lb_operator.system_config import SystemConfig


@dataclass(frozen=True, slots=True)
class ClusterOptions:
    namespaces: tuple[str, ...] = ("default",)
    lease_name: str = DEFAULT_LEASE_NAME
    identity: str | None = None
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    clock: Callable[[], float] = time.monotonic  # the elector's (tests stage expiries with it)
    watch_timeout: int = 300  # seconds a watch request lasts before it is renewed
    resync_seconds: float = 60.0
    workers: int = 2
    backoff: Backoff = Backoff()  # after API errors, for the watches and for failed reconciles
    cache_backoff: Backoff = Backoff(initial=2.0, maximum=60.0)  # re-checks of a cache not ready
    adapters: bool = True  # LoRA adapters on ready replicas (lb_operator.kube.adapters)
    autoscaler: bool = True  # request-based autoscaling on the leader
    gateway_selector: str = DEFAULT_GATEWAY_SELECTOR  # this deployment's Pods, to scrape metrics
    metrics_port: int | None = None  # gateway Pods' metrics port when their spec names none
    # file:// model and adapter URLs: invalid in a cluster (no Pod has the operator's files),
    # allowed only where Pods share its filesystem (the tests' simulated kubelet)
    allow_file_urls: bool = False


class ClusterOperator:
    """The operator side of one gateway replica. ``run()`` until cancelled.

    ``leader_tasks`` and ``hooks`` extend it (see `lb_operator.kube.leader` and
    `lb_operator.kube.reconciler`); ``scaler`` is what the replica's Gateway should be given. Built in:
    the cache step of each reconcile (with Job informers), LoRA adapters (a reconcile hook and a
    leader task) and the autoscaler (a leader task). ``metrics`` is the prometheus registry the
    autoscaler's metrics join: set it to the Gateway's (``gateway.metrics.registry``) before ``run``.
    """

    def __init__(self, api: KubeApi, registry: Registry, system: SystemConfig,
                 options: ClusterOptions = ClusterOptions(), *,
                 leader_tasks: Iterable[LeaderTask] = (),
                 hooks: Sequence[ReconcileHook] = (),
                 metrics: CollectorRegistry | None = None) -> None:
        if not options.namespaces:
            raise ValueError("at least one namespace is needed")
        self.api = api
        self.registry = registry
        self.system = system
        self.options = options
        self.metrics = metrics
        self.model_informers = [self._model_informer(ns) for ns in options.namespaces]
        self.owners = NameOwners(dict(zip(options.namespaces, self.model_informers)))
        self.pod_informers = [self._pod_informer(ns) for ns in options.namespaces]
        self.job_informers = [self._job_informer(ns) for ns in options.namespaces]
        self.endpoints = EndpointSync(registry, system, self.owners)
        self.endpoints.attach(self.model_informers, self.pod_informers)
        self.events = EventRecorder(api)
        self.adapters = (ClusterAdapters(api, self.model_informers, events=self.events)
                         if options.adapters else None)
        self.autoscaler: Autoscaler | None = None  # built on first leadership (needs the session)
        self._session: aiohttp.ClientSession | None = None
        builtin_hooks, builtin_tasks = self._builtin_extensions()
        self.reconciler = Reconciler(api, system, owners=self.owners,
                                     pod_informers=self.pod_informers, workers=options.workers,
                                     resync_seconds=options.resync_seconds,
                                     backoff=options.backoff, hooks=[*builtin_hooks, *hooks],
                                     job_informers=self.job_informers,
                                     cache_backoff=options.cache_backoff, events=self.events,
                                     allow_file_urls=options.allow_file_urls)
        self.elector = LeaderElector(
            api, options.namespaces[0], name=options.lease_name, identity=options.identity,
            lease_duration=options.lease_duration, renew_deadline=options.renew_deadline,
            retry_period=options.retry_period, clock=options.clock,
            leader_tasks=[self.reconciler.run, *builtin_tasks, *leader_tasks])
        self.scaler = ClusterScaler(api, registry, options.namespaces[0])

    def _builtin_extensions(self) -> tuple[list[ReconcileHook], list[LeaderTask]]:
        """The reconcile hooks and leader tasks of the features `options` turns on."""
        hooks: list[ReconcileHook] = []
        tasks: list[LeaderTask] = []
        if self.adapters is not None:
            hooks.append(self.adapters.hook)
            tasks.append(self.adapters.run)
        if self.options.autoscaler:
            tasks.append(self._autoscale)
        return hooks, tasks

    def _model_informer(self, namespace: str) -> Informer:
        call = functools.partial(self.api.custom.list_namespaced_custom_object, GROUP, VERSION,
                                 namespace, PLURAL)
        return Informer(f"models/{namespace}", call, watch_timeout=self.options.watch_timeout,
                        backoff=self.options.backoff)

    def _pod_informer(self, namespace: str) -> Informer:
        call = functools.partial(self.api.core.list_namespaced_pod, namespace)
        lister = functools.partial(self.api.list_pods, namespace)
        return Informer(f"pods/{namespace}", call, label_selector=POD_SELECTOR, lister=lister,
                        watch_timeout=self.options.watch_timeout, backoff=self.options.backoff)

    def _job_informer(self, namespace: str) -> Informer:
        """The cache's loader and eviction Jobs: their completion triggers the next cache step."""
        batch = self.api.batch

        async def list_jobs(**params: Any) -> dict[str, Any]:
            return self.api.plain(await batch.list_namespaced_job(namespace, **params))

        return Informer(f"jobs/{namespace}", functools.partial(batch.list_namespaced_job, namespace),
                        label_selector=JOB_SELECTOR, lister=list_jobs,
                        watch_timeout=self.options.watch_timeout, backoff=self.options.backoff)

    def _informers(self) -> list[Informer]:
        return self.model_informers + self.pod_informers + self.job_informers

    async def wait_synced(self) -> None:
        """Until every informer has listed once (the registry then holds the cluster's view)."""
        await asyncio.gather(*(i.synced.wait() for i in self._informers()))

    async def run(self) -> None:
        async with aiohttp.ClientSession() as session, asyncio.TaskGroup() as group:
            self._session = session
            for informer in self._informers():
                group.create_task(informer.run())
            group.create_task(self._elect_when_synced())

    async def _autoscale(self) -> None:
        """Leader task: the autoscaler, built once per process so its metrics register once;
        each term restores its state from the ConfigMap the previous leader wrote."""
        if self.autoscaler is None:
            self.autoscaler = self._build_autoscaler()
        await self.autoscaler.run()

    def _build_autoscaler(self) -> Autoscaler:
        assert self._session is not None, "run() owns the session"
        api, home = self.api, self.options.namespaces[0]
        config = self.system.model_autoscaling
        return Autoscaler(
            config, models=watched_models(self.owners),
            gateways=GatewayTargets(api, home, self.options.gateway_selector,
                                    fallback_port=self.options.metrics_port, local=self.metrics),
            set_replicas=ScaleByName(api, self.owners),
            store=ConfigMapStateStore(api, home, config.state_config_map_name),
            session=self._session, registry=self.metrics)

    async def _elect_when_synced(self) -> None:
        """Campaign only with a synced cache: a fresh leader's first resync must see every Model."""
        await self.wait_synced()
        await self.elector.run()
