"""The CacheAware strategy: filter, score, pick; what a request brings to it and what it leaves.

A request is cut into blocks once, by the proxy (``prompt_blocks``): the approximate blocks
(chained hashes of the rendered conversation's bytes, ``lb.prefix_index``) and, when the model
follows its replicas' KV events, the engine's own block hashes (``lb.prompt_tokens``). At pick
time (``pick``) each replica's *share* is the part of those blocks it is believed to hold:
exact for a replica whose KV-event mirror is trusted (``lb.kv_events``), else what the
approximate index remembers of the requests this worker sent it. Shares travel as an
``array('d')`` by ring slot (the index numbers replicas as the ring does), so a prefix that
every replica holds costs no dict and no key lookup per replica. The ring compares the
candidates within CHWBL's bound, with the engines' own queues from their scraped metrics: by
estimated time to first token (``scoring: CostModel``, ``Ring.pick_cost``, the default) or
by a weighted sum of scores (``scoring: Weights``, ``Ring.pick_scored``); after the lease is
taken, ``remember`` records the blocks against the replica that got them.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass
from typing import Sequence

from lb.kv_events import KVIndex
from lb.model import Model
from lb.parse import ParsedRequest, prefix_of
from lb.ring import PrefixIndex, block_hashes
from lb.prompt_tokens import for_model
from lb.registry import EndpointGroup

__all__ = ["PromptBlocks", "prompt_blocks", "pick", "remember"]

# Bytes of prompt per token, to cover with the engine's blocks the span the approximate ones cover.
_BYTES_PER_TOKEN = 4


@dataclass(slots=True)
class PromptBlocks:
    """A request's prompt as the prefix indexes see it."""

    head: str  # the first block's text: the ring key of a prompt no replica holds
    approximate: Sequence[int]  # lb.prefix_index's chained byte-block hashes, an array('Q')
    engine: list[int] | None = None  # the engine's block hashes, when its KV events are followed
    # The span the blocks cover, in tokens: what a replica holding none of them must prefill
    # (the cost model's unit; the unhashed tail is the same for every replica).
    tokens: float = 0.0


def prompt_blocks(parsed: ParsedRequest, model: Model, adapter: str) -> PromptBlocks | None:
    """The blocks of this request's prompt (None: nothing to match, e.g. embeddings). A prompt
    of token ids has no text, so only the engine's blocks (when followed) can match it."""
    settings = model.spec.load_balancing.cache_aware
    text = prefix_of(parsed, settings.block_chars * settings.max_blocks, "Conversation")
    approximate = block_hashes(text, settings.block_chars, settings.max_blocks) if text else []
    engine = None
    if settings.kv_events is not None:
        tokens = for_model(model)
        ids = tokens.token_ids(parsed) if tokens is not None else None
        if ids:
            span = (settings.block_chars * settings.max_blocks
                    // (_BYTES_PER_TOKEN * tokens.block_size))
            engine = tokens.block_hashes(ids, adapter, max(1, span)) or None
    if not text and engine is None:
        return None
    span_tokens = len(approximate) * settings.block_chars / _BYTES_PER_TOKEN
    if engine is not None:
        span_tokens = max(span_tokens, float(len(engine) * tokens.block_size))
    return PromptBlocks(text[:settings.block_chars], approximate, engine, span_tokens)


def pick(group: EndpointGroup, model: Model, adapter: str, key: str,
         exclude: list[str] | tuple[()], weight: int, prompt: PromptBlocks | None,
         kv_index: KVIndex | None, fresh_after: float) -> str | None:
    """The best replica for this request: see the module docstring, ``Ring.pick_cost`` and
    ``Ring.pick_scored``."""
    settings = model.spec.load_balancing.cache_aware
    shares = _shares(group, prompt, kv_index) if prompt is not None else None
    if settings.scoring == "CostModel":
        queues = _queues(group, fresh_after) if settings.queue_tokens and group.engine else None
        return group.ring.pick_cost(adapter + key, adapter, exclude, weight, shares, queues,
                                    prompt.tokens if prompt is not None else 0.0,
                                    float(settings.load_tokens), float(settings.queue_tokens))
    queues = _queues(group, fresh_after) if settings.queue_weight and group.engine else None
    return group.ring.pick_scored(adapter + key, adapter, exclude, weight, shares, queues,
                                  float(settings.prefix_weight), float(settings.load_weight),
                                  float(settings.queue_weight))


def remember(group: EndpointGroup, model: Model, replica: str, prompt: PromptBlocks) -> None:
    """``replica`` was sent this prompt: the approximate index notes that it now holds it."""
    if not prompt.approximate:
        return
    index = group.prefix_index
    capacity = model.spec.load_balancing.cache_aware.index_blocks
    if index is None:
        index = group.prefix_index = PrefixIndex(capacity)
    elif index.capacity != capacity:
        index.capacity = capacity  # a changed spec: the next records trim to it
    index.record(replica, prompt.approximate, group.ring.slot_of(replica))


def _shares(group: EndpointGroup, prompt: PromptBlocks,
            kv_index: KVIndex | None) -> array | None:
    """By ring slot, the share (0..1] of the prompt each replica holds; None: no replica
    holds any of it.

    A trusted mirror's word raises the estimate but does not lower it: blocks show in an
    engine's events only once computed, so a prompt this worker just sent (queued, or being
    prefilled) is not in the mirror yet, and the requests right behind it on the same prefix
    went elsewhere and prefilled it again (the routing study's documents workload: 0.86x
    PrefixHash's mean TTFT with the replacing rule, against 0.47x without KV events)."""
    index = group.prefix_index
    shares = index.share_array(prompt.approximate) if index is not None else None
    engine = prompt.engine
    if engine and kv_index is not None:
        ring = group.ring
        for replica in group.endpoints:
            if kv_index.trusted(replica):
                depth = kv_index.match(replica, engine)
                if depth:
                    slot = ring.slot_of(replica)
                    if shares is None:
                        shares = array("d")
                    if len(shares) <= slot:
                        shares.extend([0.0] * (slot + 1 - len(shares)))
                    shares[slot] = max(shares[slot], depth / len(engine))
    return shares


def _queues(group: EndpointGroup, fresh_after: float) -> dict[str, float]:
    """Replica -> its engine's queue (waiting requests, plus a full KV cache as queued work),
    from readings newer than ``fresh_after``; a stale replica counts as an empty queue.

    Kept on the group between picks: built again only when a reading changed or the oldest
    one it holds went stale (a scrape every few seconds, against thousands of picks)."""
    cached = group.queue_cache
    if cached is not None and cached[0] == group.engine_version and cached[1] >= fresh_after:
        return cached[2]
    fresh = [(replica, reading) for replica, reading in group.engine.items()
             if reading.read_at >= fresh_after]
    queues = {replica: reading.queued for replica, reading in fresh}
    oldest = min((reading.read_at for _, reading in fresh), default=math.inf)
    group.queue_cache = (group.engine_version, oldest, queues)
    return queues
