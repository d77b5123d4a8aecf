"""The kvgate chart's values.schema.json: the config sections generated from the config dataclasses.

The chart passes `gateway.*`, `messaging` (top level, as in KubeAI's chart) and the operator's system sections (`modelServers`, `resourceProfiles`,
...) into config.yaml, so their schema is written by lb.schema from the same dataclasses, types,
bounds and docs the loaders decode with, and helm refuses at install time what `kvgate serve` would
refuse at start-up. Chart-only values (image, service, probes, ...) have no dataclass; they stay
hand-written in values.schema.chart.json beside the generated file.

Regenerate with `python -m kvgate.values_schema charts/kvgate > charts/kvgate/values.schema.json`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

from lb.config import Config, ServerConfig
from lb.schema import JsonSchema, fields_of
from lb_operator.system_config import SystemConfig

CHART_PART = "values.schema.chart.json"
# The chart's `gateway:` block: server.logLevel (the chart owns host and ports) and these sections.
GATEWAY_SECTIONS = ("retries", "queue", "limits", "upstream", "ejection", "routing", "engineMetrics",
                    "healthChecks", "apiKeys", "tracing")
# Gateway sections the chart has at its top level, where KubeAI's chart has them.
GATEWAY_TOP_LEVEL = ("messaging",)
# System keys the chart has no value for; extraConfig can still set them.
NOT_IN_VALUES = frozenset({"allowPodAddressOverride"})


def values_schema(chart_dir: Path) -> dict[str, Any]:
    """The hand-written chart part with the generated config sections added to its properties."""
    schema = json.loads((chart_dir / CHART_PART).read_text())
    writer = JsonSchema(closed=True)
    config = {spec.key: spec for spec in fields_of(Config)}
    server = {spec.key: spec for spec in fields_of(ServerConfig)}
    gateway = {"logLevel": writer.field(server["logLevel"])}
    gateway.update((key, writer.field(config[key])) for key in GATEWAY_SECTIONS)
    schema["properties"]["gateway"] = {
        "description": "Gateway settings: config.yaml's server.logLevel and its " + ", ".join(GATEWAY_SECTIONS) + ".",
        "type": "object", "properties": gateway, "additionalProperties": False,
    }
    for key in GATEWAY_TOP_LEVEL:
        schema["properties"][key] = writer.field(config[key])
    for spec in fields_of(SystemConfig):
        if spec.key not in NOT_IN_VALUES:
            schema["properties"][spec.key] = writer.field(spec)
    return schema


def render(chart_dir: Path) -> str:
    return json.dumps(values_schema(chart_dir), indent=2) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 1:
        print("usage: python -m kvgate.values_schema CHART_DIR > CHART_DIR/values.schema.json", file=sys.stderr)
        return 2
    sys.stdout.write(render(Path(args[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
