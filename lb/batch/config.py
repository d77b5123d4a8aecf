"""The `batch:` section of the gateway's config: where the Files and Batches API keeps its
state, its limits, and how hard a batch may push the replicas."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lb.schema import setting

# OpenAI's bounds on `expires_after.seconds` and `output_expires_after.seconds` (1 hour, 30 days).
MIN_EXPIRY_SECONDS = 3600
MAX_EXPIRY_SECONDS = 30 * 24 * 3600
JournalMode = Literal["wal", "delete"]


@dataclass(frozen=True, slots=True)
class BatchConfig:
    state_dir: str = setting("", doc="Directory of the Files and Batches API's store (SQLite metadata and the "
                             "file bodies). Empty turns the API off, except under `kvgate up`, which uses "
                             "`<local.stateDir>/batch`. Every gateway process (and replica) sharing it shares "
                             "the files and batches; each batch is run by one of them at a time.")
    max_file_bytes: int = setting(200 * 1024 * 1024, doc="Largest file accepted by POST /files.", minimum=1)
    max_requests: int = setting(50_000, doc="Most request lines one batch may hold.", minimum=1)
    concurrency: int = setting(32, doc="Requests of one batch in flight at once.", minimum=1, maximum=10_000)
    max_running: int = setting(4, doc="Batches one gateway process runs at once.", minimum=1)
    poll_seconds: float = setting(1.0, doc="How often a gateway process looks for batches to run.",
                                  exclusive_minimum=0)
    lease_seconds: float = setting(15.0, doc="How long a process's claim on a batch lasts without renewal; "
                                   "a batch whose runner died is taken over after this.", exclusive_minimum=0)
    max_window_seconds: int = setting(7 * 24 * 3600, doc="Longest completion_window accepted (OpenAI's is 24h).",
                                      minimum=1)
    min_expiry_seconds: int = setting(MIN_EXPIRY_SECONDS, doc="Shortest `expires_after.seconds` (files) and "
                                      "`output_expires_after.seconds` (a batch's output and error files) "
                                      "accepted; OpenAI's is 3600.", minimum=1, maximum=MAX_EXPIRY_SECONDS)
    file_expiry_seconds: int = setting(MAX_EXPIRY_SECONDS, doc="When an upload that gives no `expires_after` "
                                       "expires, in seconds after it was created: OpenAI's 30 days for files "
                                       "of purpose `batch`. 0 keeps such files until they are deleted.",
                                       minimum=0, maximum=MAX_EXPIRY_SECONDS)
    sweep_seconds: float = setting(60.0, doc="How often expired files are deleted (bodies and metadata). An "
                                   "expired file is a 404 from the moment it expires, swept or not.",
                                   exclusive_minimum=0)
    single_model: bool = setting(True, doc="Every line of a batch must name the model of its first runnable "
                                 "line (OpenAI's rule); other lines fail with `mismatched_model`. Off: a "
                                 "batch may mix models and adapters.")
    max_line_bytes: int = setting(8 * 1024 * 1024, doc="Longest input line (one request); a longer one fails "
                                  "with `line_too_long` and the rest of the batch runs.", minimum=1)
    max_embedding_inputs: int = setting(50_000, doc="Most embedding inputs one /v1/embeddings batch may hold "
                                        "across all its lines (OpenAI's limit); a line that does not fit in "
                                        "what is left fails with `too_many_embedding_inputs`.", minimum=1)
    journal_mode: JournalMode = setting("wal", doc="SQLite journal of the store: `wal` (fast; needs a local "
                                        "file system) or `delete` (for a network file system shared by "
                                        "replicas, where WAL's shared memory is unsafe).")
