"""The console's settings (the ``console:`` key of the gateway config)."""

from __future__ import annotations

from dataclasses import dataclass

from lb.schema import setting


@dataclass(frozen=True, slots=True)
class ConsoleConfig:
    enabled: bool | None = setting(
        None, doc="Serve the web console at `/ui` and its status API at `/ui/api/`. Unset: on "
        "with `kvgate up`, off with `kvgate gateway` and `kvgate serve`.")
    admin_keys: tuple[str, ...] = setting(
        (), doc="With API keys on, the names of the keys that may read the console's API (the "
        "page itself holds no data). Empty: no key may, so turning keys on never exposes the "
        "console by accident.", json={"items": {"type": "string", "minLength": 1}})
    window_seconds: int = setting(600, doc="How far back the console's request rate and "
                                  "time-to-first-byte figures reach.", minimum=60, maximum=3600)
