"""The studies of ``python -m bench``: one module each, named as on the command line.

A study module has a ``main(argv) -> int``. Studies share helpers (``bench.procs``,
``bench.load_tools``, ``bench.rings``, ``bench.results``, ...) and never import each other.
"""

# study -> the one line ``python -m bench --help`` shows for it
STUDIES: dict[str, str] = {
    "routing": "TTFT and throughput per routing strategy (KubeAI's study)",
    "ring": "ring pick and add/remove cost, Cython vs pure Python",
    "upstream": "CPU per request: kvgate's HTTP/1.1 client vs aiohttp",
    "peers": "kvgate vs direct, bare proxy, nginx, LiteLLM (--proxy-only)",
    "scale": "memory per open stream, queue drain, big rings",
    "batch": "interactive TTFT alone and while a Batch API job runs",
    "profile": "where the saturated gateway's CPU goes (py-spy)",
    "instructions": "instructions per request under callgrind, vs another checkout",
    "flow": "saturation: priority TTFT, tenant fairness, chaos counters",
}
