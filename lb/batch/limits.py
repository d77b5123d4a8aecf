"""Limits that look at a batch's lines together, or at a line's size: one model per batch,
the longest line, and the embedding inputs of a whole /v1/embeddings batch.

Each refusal is a line error (code, message, param), written to the error file with the line's
custom_id and counted as failed; the rest of the batch runs. A line's size is checked here, at
validation, rather than at upload: an upload is streamed to disk without being read line by
line (a 200 MB file must not be scanned in the event loop, nor refused whole for one long line),
and a file may be uploaded before anyone knows which limits the batch that reads it will have.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lb.batch.config import BatchConfig

EMBEDDINGS = "/v1/embeddings"
# (code, message, param) of a refused line, as `jsonl.LineError` takes them.
Refusal = tuple[str, str, str | None]


@dataclass(slots=True)
class BatchLimits:
    """The limits of one batch's validation, with what its lines so far have used."""

    max_line_bytes: int
    single_model: bool
    max_embedding_inputs: int | None  # None: not an embeddings batch
    model: str | None = None  # the model of the first runnable line
    embedding_inputs: int = field(default=0)

    @classmethod
    def of(cls, config: BatchConfig, endpoint: str) -> BatchLimits:
        return cls(config.max_line_bytes, config.single_model,
                   config.max_embedding_inputs if endpoint == EMBEDDINGS else None)

    def size(self, number: int, length: int) -> Refusal | None:
        """A line longer than batch.maxLineBytes (its length in bytes, without the newline)."""
        if length <= self.max_line_bytes:
            return None
        return ("line_too_long", f"Line {number} is {length} bytes long; a line may be at most "
                f"{self.max_line_bytes} bytes (batch.maxLineBytes).", None)

    def admit(self, number: int, body: dict[str, Any]) -> Refusal | None:
        """A line that passed every check of its own: refused if it names another model than
        the batch's or has more embedding inputs than are left; else counted in."""
        model = body["model"]
        if self.single_model:
            if self.model is None:
                self.model = model
            elif model != self.model:
                return ("mismatched_model", f"Line {number} names the model {model!r}, but the "
                        f"batch's is {self.model!r} (its first request's); a batch runs one "
                        "model.", "body.model")
        if self.max_embedding_inputs is not None:
            inputs = embedding_inputs(body.get("input"))
            left = self.max_embedding_inputs - self.embedding_inputs
            if inputs > left:
                return ("too_many_embedding_inputs", f"Line {number} has {inputs} embedding "
                        f"inputs, more than the {left} left of the batch's "
                        f"{self.max_embedding_inputs} (batch.maxEmbeddingInputs).", "body.input")
            self.embedding_inputs += inputs
        return None


def embedding_inputs(value: Any) -> int:
    """How many embeddings a request's `input` asks for: a string or one array of token ids is
    one, an array of strings (or of token arrays) one per item. Anything else counts one (the
    replica will refuse it)."""
    if isinstance(value, list):
        if value and all(isinstance(x, int) and not isinstance(x, bool) for x in value):
            return 1
        return len(value)
    return 1
