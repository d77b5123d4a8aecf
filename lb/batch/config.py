"""The `batch:` section of the gateway's config: where the Files and Batches API keeps its
state, its limits, and how hard a batch may push the replicas."""

from __future__ import annotations

from dataclasses import dataclass

from lb.schema import setting


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
