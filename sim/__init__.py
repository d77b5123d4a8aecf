"""A faithful vLLM simulator: continuous batching, paged KV cache with prefix caching, LoRA slots,
vLLM's metrics and OpenAI API, served over real HTTP.

In-process use (tests, the routing study)::

    from kvgate_sim import start_replicas
    cluster = await start_replicas(8, profile="cpu-scaled", model_name="llama")
    print(cluster.urls)
    await cluster.stop()

Command line: ``python -m kvgate_sim --port 8000 --replicas 8 --profile fast``.
"""

from .cli import main
from .cluster import Replica, SimCluster, start_replicas
from .engine import Engine, Sequence
from .faults import Faults
from .kvcache import KVCache
from .profiles import PROFILES, Profile, get_profile, scale_profile
from .server import SimServer

__all__ = [
    "Engine", "Faults", "KVCache", "PROFILES", "Profile", "Replica", "Sequence", "SimCluster",
    "SimServer", "get_profile", "main", "scale_profile", "start_replicas",
]
