"""Shared fixtures. The gateway tests use tests/gateway_harness.py: one event-loop thread for
the whole session, a fresh gateway and fresh backends per test."""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterator

import pytest

from tests.gateway_harness import ERRORS, GatewayHarness, LoopThread

# The cluster tests' fixtures (api, kubelet, replica), over each module's own `kube` fixture.
pytest_plugins = ["tests.cluster_harness"]


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture
def make_gateway(loop_thread: LoopThread) -> Iterator[Callable[..., GatewayHarness]]:
    """Factory: ``make_gateway({"queue": {"timeoutSeconds": 1}})`` starts a gateway with
    that config (camelCase, merged over the defaults); ``static=True`` serves the config's
    models and endpoints. All are stopped after the test."""
    started: list[GatewayHarness] = []
    ERRORS.records.clear()

    def make(config: dict[str, Any] | None = None, static: bool = False) -> GatewayHarness:
        harness = GatewayHarness(loop_thread, config, static)
        started.append(harness)
        return harness

    yield make
    for harness in started:
        harness.close()
    allowed = [fragment for harness in started for fragment in harness.allowed_errors]
    unexpected = [r for r in ERRORS.records
                  if not any(fragment in r.getMessage() for fragment in allowed)]
    ERRORS.records.clear()
    if unexpected:
        pytest.fail("the gateway logged errors:\n" + "\n".join(
            f"{r.name}: {r.getMessage()}\n"
            + (logging.Formatter().formatException(r.exc_info) if r.exc_info else "")
            for r in unexpected))


@pytest.fixture
def gw(make_gateway: Callable[..., GatewayHarness]) -> GatewayHarness:
    """A gateway with the default config (quiet logs)."""
    return make_gateway()


# Real model servers need a long build; their tests are collected only when asked for.
if not os.environ.get("KVGATE_ENGINE_TESTS"):
    collect_ignore_glob = ["engines/*"]
