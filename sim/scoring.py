"""vLLM's scoring APIs: `POST /v1/score` (pairs of texts, one score each) and `POST /v1/rerank`
(Cohere's and Jina's shape: a query and documents, ranked).

A cross-encoder is stood in for by word overlap: the share of words two texts have in common
(cosine over word sets), so scores are deterministic, in [0, 1], and rank a document that
answers the query above one that does not, which is all a client or a test can check.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any

from .errors import SimError
from .formats import new_id
from .tokenizer import count_tokens

_WORD = re.compile(r"\w+")
# The names vLLM has given the two sides of a score request over its versions.
_PAIRS = (("queries", "documents"), ("data_1", "data_2"), ("text_1", "text_2"))


def relevance(query: str, document: str) -> float:
    a, b = set(_WORD.findall(query.lower())), set(_WORD.findall(document.lower()))
    if not a or not b:
        return 0.0
    return len(a & b) / math.sqrt(len(a) * len(b))


def _texts(value: Any, name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    raise SimError(400, f"'{name}' must be a string or a non-empty list of strings.", param=name)


def score_pairs(body: dict) -> list[tuple[str, str]]:
    """The pairs to score: 1 to 1, 1 to N, or N to N (vLLM's rules)."""
    for first, second in _PAIRS:
        if first in body or second in body:
            left, right = _texts(body.get(first), first), _texts(body.get(second), second)
            if len(left) == 1:
                return [(left[0], text) for text in right]
            if len(left) != len(right):
                raise SimError(400, f"'{first}' and '{second}' must have the same length.",
                               param=second)
            return list(zip(left, right))
    raise SimError(400, "'text_1' and 'text_2' (or 'queries' and 'documents') are required.",
                   param="text_1")


def score_response(model: str, pairs: list[tuple[str, str]]) -> dict:
    tokens = sum(count_tokens(a) + count_tokens(b) for a, b in pairs)
    return {"id": new_id("score"), "object": "list", "created": int(time.time()),
            "model": model,
            "data": [{"index": i, "object": "score", "score": relevance(a, b)}
                     for i, (a, b) in enumerate(pairs)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens,
                      "completion_tokens": 0, "prompt_tokens_details": None}}


def rerank_response(model: str, body: dict) -> dict:
    query = body.get("query")
    if not isinstance(query, str):
        raise SimError(400, "'query' must be a string.", param="query")
    documents = _texts(body.get("documents"), "documents")
    top_n = body.get("top_n") or len(documents)
    if not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 0:
        raise SimError(400, "'top_n' must be a non-negative integer.", param="top_n")
    ranked = sorted(((relevance(query, doc), i, doc) for i, doc in enumerate(documents)),
                    key=lambda r: (-r[0], r[1]))
    tokens = sum(count_tokens(query) + count_tokens(doc) for doc in documents)
    return {"id": new_id("rerank"), "model": model, "usage": {"total_tokens": tokens},
            "results": [{"index": i, "document": {"text": doc}, "relevance_score": score}
                        for score, i, doc in ranked[:top_n]]}
