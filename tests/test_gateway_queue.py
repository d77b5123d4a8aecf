"""The request queue under saturation (``replicaCapacity``): priority classes, fairness across
API keys, shedding, class deadlines and exact counters, over real HTTP with the OpenAI SDK.

Each test holds a test backend so its one slot stays taken, queues requests in a known order,
then lets the backend go: the order in which requests reach the backend is the order the queue
served them (capacity 1 lets one through at a time).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import time
from typing import Any

import aiohttp
import openai
import pytest

from lb.flow_queue import LOWEST, PRIORITY, QueueConfig, priority_class
from lb.schema import SchemaError, decode_object
from tests.test_gateway_api_keys import write_keys

HEADER = "X-Kvgate-Priority"


def ask(client: openai.OpenAI, text: str, priority: str | None = None) -> Any:
    headers = {HEADER: priority} if priority else None
    return client.chat.completions.create(model="m", messages=[{"role": "user", "content": text}],
                                          extra_headers=headers)


def served_order(backend: Any) -> list[str]:
    return [seen.json["messages"][0]["content"] for seen in backend.seen]


class Saturated:
    """A model of capacity 1 on one held backend, its slot taken by a first request; ``queue``
    sends further requests one after another, each once the previous is queued."""

    def __init__(self, gw: Any, pool: concurrent.futures.ThreadPoolExecutor) -> None:
        self.gw, self.pool = gw, pool
        self.backend = gw.backend("b")
        gw.model_with("m", [self.backend], replica_capacity=1)
        gw.on_loop(self.backend.hold)
        self.futures = [pool.submit(ask, gw.client(), "first")]
        gw.wait_for(lambda: self.backend.in_flight == 1, what="the slot taken")

    def queue(self, client: openai.OpenAI, text: str, priority: str | None = None,
              displacing: concurrent.futures.Future[Any] | None = None) -> Any:
        """Send a request and wait until it is queued (or answered, or has ``displacing``
        answered: the request it took the place of)."""
        before = self.gw.on_loop(self.gw.balancer.waiting, "m")
        future = self.pool.submit(ask, client, text, priority)
        if displacing is not None:
            displacing.exception(30)
        else:  # the predicate runs on the gateway's loop
            self.gw.wait_for(lambda: self.gw.balancer.waiting("m") == before + 1
                             or future.done(), what=f"{text} queued")
        self.futures.append(future)
        return future

    def release(self) -> list[Any]:
        self.gw.on_loop(self.backend.release)
        return [f.result(30) for f in self.futures]


@pytest.fixture
def pool():
    with concurrent.futures.ThreadPoolExecutor(32) as executor:
        yield executor


def test_capacity_caps_in_flight_and_queues_the_rest(gw, pool):
    backends = [gw.backend("b1"), gw.backend("b2")]
    gw.model_with("m", backends, replica_capacity=2)
    for b in backends:
        gw.on_loop(b.hold)
    client = gw.client()
    futures = [pool.submit(ask, client, f"r{i}") for i in range(7)]
    gw.wait_for(lambda: gw.balancer.waiting("m") == 3
                and [b.in_flight for b in backends] == [2, 2], what="four sent, three queued")
    time.sleep(0.2)  # nothing more goes through while the slots stay taken
    assert [b.in_flight for b in backends] == [2, 2]
    assert gw.on_loop(gw.balancer.waiting, "m") == 3
    assert gw.metric("kvgate_waiting_requests", model="m") == 3
    for b in backends:
        gw.on_loop(b.release)
    assert len([f.result(30) for f in futures]) == 7
    assert sum(b.total_calls for b in backends) == 7
    gw.settle()


def test_the_batch_class_fills_only_its_share_of_a_replica(gw, pool):
    backend = gw.backend("b")
    gw.model_with("m", [backend], replica_capacity=4)  # the batch class's share: 0.5
    gw.on_loop(backend.hold)
    client = gw.client()
    lines = [pool.submit(ask, client, f"line{i}", "batch") for i in range(4)]
    gw.wait_for(lambda: backend.in_flight == 2 and gw.balancer.waiting("m") == 2,
                what="two lines in flight, two queued")
    interactive = [pool.submit(ask, client, f"chat{i}") for i in range(2)]
    gw.wait_for(lambda: backend.in_flight == 4, what="the interactive requests in the free slots")
    assert gw.on_loop(gw.balancer.waiting, "m") == 2  # they did not queue; the lines still do
    gw.on_loop(backend.release)
    assert len([f.result(30) for f in lines + interactive]) == 6
    gw.settle()


def test_a_class_share_counts_newcomers_and_queued_alike(gw, pool):
    backend = gw.backend("b")
    gw.model_with("m", [backend], replica_capacity=3)  # half of 3: one line at a time
    gw.on_loop(backend.hold)
    client = gw.client()
    lines = [pool.submit(ask, client, f"line{i}", "batch") for i in range(3)]
    gw.wait_for(lambda: backend.in_flight == 1 and gw.balancer.waiting("m") == 2,
                what="one line in flight, two queued")
    gw.on_loop(backend.release)
    assert len([f.result(30) for f in lines]) == 3
    assert backend.most_in_flight == 1
    gw.settle()


def test_lines_freed_together_are_sent_to_their_replica_apart(gw, pool):
    """The batch class is paced (``lb.pacing``): once a line's time on the replica is known
    (0.2 s here), the lines queued behind go out at least 0.8 x 0.2 s / 2 slots apart instead
    of together, while the share still caps them at 2 in flight."""
    backend = gw.backend("b", header_delay=0.2)
    gw.model_with("m", [backend], replica_capacity=4)  # the batch class's share: 2 lines
    client = gw.client()
    lines = [pool.submit(ask, client, f"line{i}", "batch") for i in range(6)]
    assert len([f.result(30) for f in lines]) == 6
    arrived = [seen.at for seen in backend.seen]
    assert arrived[1] - arrived[0] < 0.08  # nothing known yet: the first two go at once
    gaps = [b - a for a, b in zip(arrived[2:], arrived[3:])]
    assert min(gaps) >= 0.07, gaps
    assert backend.most_in_flight == 2
    gw.settle()


def test_a_higher_class_is_served_before_a_queued_lower_one(gw, pool):
    s = Saturated(gw, pool)
    client = gw.client()
    for i in range(3):
        s.queue(client, f"batch{i}", "batch")
    s.queue(client, "normal")
    s.queue(client, "urgent", "critical")
    s.release()
    assert served_order(s.backend) == ["first", "urgent", "normal", "batch0", "batch1", "batch2"]
    gw.settle()


def test_tenants_of_one_class_are_served_round_robin(make_gateway, tmp_path, pool):
    path = tmp_path / "keys.yaml"
    secrets = write_keys(path, heavy={"models": ["*"]}, light={"models": ["*"]})
    gw = make_gateway({"apiKeys": {"enabled": True, "file": str(path)}})
    gw.add_model("m", replica_capacity=1)
    heavy = gw.client(api_key=secrets["heavy"])
    light = gw.client(api_key=secrets["light"])
    s = _saturate_with_key(gw, pool, heavy)
    for i in range(6):
        s.queue(heavy, f"h{i}")
    for i in range(2):
        s.queue(light, f"l{i}")
    s.release()
    assert served_order(s.backend) == ["first", "h0", "l0", "h1", "l1", "h2", "h3", "h4", "h5"]
    gw.settle()


def _saturate_with_key(gw: Any, pool: concurrent.futures.ThreadPoolExecutor,
                       client: openai.OpenAI) -> Saturated:
    """``Saturated`` whose first request carries ``client``'s key (keys are on)."""
    s = Saturated.__new__(Saturated)
    s.gw, s.pool = gw, pool
    s.backend = gw.backend("keyed")
    gw.set_endpoints("m", [s.backend])
    gw.on_loop(s.backend.hold)
    s.futures = [pool.submit(ask, client, "first")]
    gw.wait_for(lambda: s.backend.in_flight == 1, what="the slot taken")
    return s


def test_a_keys_class_is_a_ceiling_the_header_may_only_lower(make_gateway, tmp_path, pool):
    path = tmp_path / "keys.yaml"
    secrets = write_keys(path, low={"models": ["*"], "priority": "batch"},
                         mid={"models": ["*"]}, top={"models": ["*"], "priority": "critical"})
    gw = make_gateway({"apiKeys": {"enabled": True, "file": str(path)}})
    gw.add_model("m", replica_capacity=1)
    low, mid, top = (gw.client(api_key=secrets[n]) for n in ("low", "mid", "top"))
    s = _saturate_with_key(gw, pool, mid)
    s.queue(low, "low asks critical", "critical")  # stays batch
    s.queue(top, "top lowers itself", "batch")  # becomes batch, behind the other batch
    s.queue(mid, "mid")
    s.release()
    assert served_order(s.backend) == ["first", "mid", "low asks critical", "top lowers itself"]
    gw.settle()


def test_an_unknown_class_is_a_400_naming_the_classes(gw, pool):
    s = Saturated(gw, pool)
    future = s.queue(gw.client(), "x", "urgent-please")
    with pytest.raises(openai.BadRequestError) as info:
        future.result(30)
    error = info.value.body
    assert error["code"] == "invalid_request" and error["param"] == HEADER
    assert "critical, default, batch" in error["message"]
    s.futures.remove(future)
    s.release()
    gw.settle()


def test_a_full_queue_sheds_the_lowest_class_first(make_gateway, pool):
    gw = make_gateway({"queue": {"maxQueuedPerModel": 2, "retryAfterSeconds": 3}})
    s = Saturated(gw, pool)
    client = gw.client()
    b0 = s.queue(client, "batch0", "batch")
    b1 = s.queue(client, "batch1", "batch")
    s.queue(client, "urgent", "critical", displacing=b1)  # takes the newest batch one's place
    with pytest.raises(openai.RateLimitError) as info:
        b1.result(30)
    assert info.value.response.headers["retry-after"] == "3"
    assert info.value.body["code"] == "queue_full"
    # A newcomer of the lowest class finds no one below it: refused.
    refused = pool.submit(ask, client, "batch2", "batch")
    with pytest.raises(openai.RateLimitError):
        refused.result(30)
    s.futures.remove(b1)
    s.release()
    assert b0.done()
    assert served_order(s.backend) == ["first", "urgent", "batch0"]
    assert gw.metric("kvgate_queue_rejected_total", model="m", priority="batch",
                     reason="shed") == 1
    assert gw.metric("kvgate_queue_rejected_total", model="m", priority="batch",
                     reason="full") == 1
    gw.settle()


def test_within_a_full_class_the_largest_flow_gives_way(make_gateway, tmp_path, pool):
    path = tmp_path / "keys.yaml"
    secrets = write_keys(path, hog={"models": ["*"]}, newcomer={"models": ["*"]})
    gw = make_gateway({"apiKeys": {"enabled": True, "file": str(path)},
                       "queue": {"maxQueuedPerModel": 3}})
    gw.add_model("m", replica_capacity=1)
    hog, newcomer = gw.client(api_key=secrets["hog"]), gw.client(api_key=secrets["newcomer"])
    s = _saturate_with_key(gw, pool, hog)
    hogs = [s.queue(hog, f"hog{i}") for i in range(3)]
    s.queue(newcomer, "new", displacing=hogs[2])  # the hog's newest request gives its place
    with pytest.raises(openai.RateLimitError):
        hogs[2].result(30)
    s.futures.remove(hogs[2])
    s.release()
    assert served_order(s.backend) == ["first", "hog0", "new", "hog1"]
    gw.settle()


def test_each_class_has_its_own_deadline(make_gateway, pool):
    classes = [{"name": "default", "priority": 1},
               {"name": "batch", "priority": 0, "timeoutSeconds": 0.3}]
    gw = make_gateway({"queue": {"classes": classes, "timeoutSeconds": 30,
                                 "retryAfterSeconds": 2}})
    s = Saturated(gw, pool)
    started = time.monotonic()
    late = s.queue(gw.client(), "batch", "batch")
    with pytest.raises(openai.InternalServerError) as info:
        late.result(30)
    assert time.monotonic() - started >= 0.3
    assert info.value.status_code == 503 and info.value.body["code"] == "queue_timeout"
    assert info.value.response.headers["retry-after"] == "2"
    assert gw.metric("kvgate_queue_rejected_total", model="m", priority="batch",
                     reason="timeout") == 1
    s.futures.remove(late)
    s.release()
    gw.settle()


async def test_queued_clients_that_hang_up_leave_exact_counters(gw):
    """Saturated, with requests arriving, queueing and hanging up at random: afterwards no
    request is queued or in flight, and every request that stayed was answered."""
    backends = [gw.backend("b1", chunk_delay=0.01), gw.backend("b2", chunk_delay=0.01)]
    gw.model_with("m", backends, replica_capacity=2)
    rng = random.Random(7)
    answered = hung_up = 0

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        nonlocal answered, hung_up
        body = {"model": "m", "stream": i % 2 == 0,
                "messages": [{"role": "user", "content": f"r{i}"}]}
        headers = {HEADER: rng.choice(["critical", "default", "batch"])}
        timeout = aiohttp.ClientTimeout(total=rng.choice([0.02, 0.1, 30, 30]))
        try:
            async with session.post(gw.url + "/v1/chat/completions", json=body, headers=headers,
                                    timeout=timeout) as response:
                await response.read()
                assert response.status == 200
                answered += 1
        except TimeoutError:
            hung_up += 1

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(one(session, i) for i in range(300)))
    assert answered and hung_up and answered + hung_up == 300
    gw.wait_for(lambda: gw.balancer.waiting("m") == 0, what="an empty queue")
    gw.settle()
    assert gw.metric("kvgate_waiting_requests", model="m") == 0


def test_priority_class_of_a_request():
    config = QueueConfig()
    plain = {"headers": []}
    assert priority_class(config, plain, None) == "default"
    assert priority_class(config, plain, "critical") == "critical"
    assert priority_class(config, plain, "renamed-since") == "default"  # a key's stale class
    asked = {"headers": [(b"x-kvgate-priority", b"batch")]}
    assert priority_class(config, asked, None) == "batch"
    assert priority_class(config, asked, "critical") == "batch"
    upward = {"headers": [(b"x-kvgate-priority", b"critical")]}
    assert priority_class(config, upward, None) == "critical"  # keys off: the header decides
    assert priority_class(config, upward, "batch") == "batch"
    assert priority_class(config, {"headers": [], PRIORITY: LOWEST}, "critical") == "batch"


def test_only_the_default_batch_class_is_paced_unless_a_class_says_so():
    assert [c.paced for c in QueueConfig().classes] == [False, False, True]
    custom = decode_object(QueueConfig, {"defaultClass": "bulk", "classes": [
        {"name": "bulk", "priority": 0, "capacityShare": 0.5},
        {"name": "lines", "priority": 1, "capacityShare": 0.5, "paced": True}]}, "queue")
    assert [c.paced for c in custom.classes] == [False, True]


def test_an_unpaced_class_sends_lines_freed_together_at_once(make_gateway, pool):
    """A class with a share but without ``paced``: the two lines queued behind a held pair go
    out together when it ends (paced, they would be at least 0.8 x the pair's time / 2 apart)."""
    gw = make_gateway({"queue": {"classes": [
        {"name": "default", "priority": 100},
        {"name": "batch", "priority": 0, "capacityShare": 0.5}]}})
    backend = gw.backend("b")
    gw.model_with("m", [backend], replica_capacity=4)
    gw.on_loop(backend.hold)
    client = gw.client()
    lines = [pool.submit(ask, client, f"line{i}", "batch") for i in range(4)]
    gw.wait_for(lambda: backend.in_flight == 2 and gw.balancer.waiting("m") == 2,
                what="two lines in flight, two queued")
    time.sleep(0.5)
    gw.on_loop(backend.release)
    assert len([f.result(30) for f in lines]) == 4
    arrived = [seen.at for seen in backend.seen]
    assert arrived[3] - arrived[2] < 0.2  # paced: >= 0.8 x 0.5 s / 2
    assert backend.most_in_flight == 2
    gw.settle()


@pytest.mark.parametrize("data, where", [
    ({"classes": []}, "classes"),
    ({"classes": [{"name": "a", "priority": 1}, {"name": "a", "priority": 2}]}, "classes"),
    ({"defaultClass": "nope"}, "defaultClass"),
    ({"classes": [{"name": "a b", "priority": 1}]}, "classes[0].name"),
])
def test_bad_queue_config_names_the_key(data, where):
    with pytest.raises(SchemaError) as info:
        decode_object(QueueConfig, data, "queue")
    assert where in str(info.value)
