"""Load generators the studies share: wrk (closed loop, or Poisson arrivals) and hey (bursts).

Each runs on CPU 0 (the servers under test get CPU 1), POSTs one chat body to
``/v1/chat/completions`` and returns requests/s and latency percentiles in milliseconds.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import orjson

from bench.procs import pinned_cmd

# A small chat request: ``CHAT_BODY % (model, extra)``, where ``extra`` adds fields such as
# ``,"stream":true``.
CHAT_BODY = ('{"model":"%s","messages":[{"role":"system","content":"You are a helpful assistant."},'
             '{"role":"user","content":"Tell me about consistent hashing with bounded loads."}]%s}')

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def run_wrk(port: int, body: str, duration: int, connections: int,
            headers: dict[str, str] | None = None, timeout: int = 2,
            think_ms: float = 0.0) -> dict[str, float]:
    """wrk, one thread, POSTing ``body``. With ``think_ms``, each connection waits an
    exponentially distributed time of that mean before each request (wrk's ``delay()``), so
    many connections together offer a Poisson stream of requests instead of a closed loop."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                     f"wrk.body = {orjson.dumps(body).decode()}\n")
        for name, value in (headers or {}).items():
            script.write(f"wrk.headers[{orjson.dumps(name).decode()}] = "
                         f"{orjson.dumps(value).decode()}\n")
        if think_ms:
            script.write(f"function delay() return -math.log(1 - math.random()) * {think_ms} end\n")
    try:
        out = subprocess.run(
            pinned_cmd(["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency",
                        f"--timeout={timeout}s", "-s", script.name,
                        f"http://127.0.0.1:{port}/v1/chat/completions"], 0),
            capture_output=True, text=True, check=True, timeout=duration + timeout + 30).stdout
    finally:
        os.unlink(script.name)
    if "Non-2xx" in out:
        raise RuntimeError(f"wrk saw error responses:\n{out}")
    latency = dict(re.findall(r"^\s+(\d+)%\s+([\d.]+\w+)", out, re.M))
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "requests": int(re.search(r"(\d+) requests in", out).group(1)),
            "p50": _ms(latency["50"]), "p99": _ms(latency["99"])}


def run_paced(port: int, body: str, rate: int, duration: int,
              headers: dict[str, str] | None = None) -> dict[str, float]:
    """About ``rate`` req/s arriving as independent clients would: ``_PACED_CONNECTIONS``
    connections, each sending after an exponential think time, which together make a Poisson
    stream (minus the time requests take, so the achieved rate, returned as ``rps``, is a few
    percent lower). Latency is timed from each request's own send."""
    return run_wrk(port, body, duration, _PACED_CONNECTIONS, headers, timeout=10,
                   think_ms=_PACED_CONNECTIONS / rate * 1e3)


# Enough connections that the arrivals are close to Poisson at any rate worth measuring.
_PACED_CONNECTIONS = 50


def run_hey(port: int, body: str, rate: int, duration: int,
            headers: dict[str, str] | None = None) -> tuple[float, float]:
    """(p50, p99) ms from hey at ``rate`` req/s. hey's workers each tick at ``rate / 10`` and
    start together, so requests come in bursts of 10 every ``10 / rate`` s: a burst test at a
    moderate mean rate (latency ≈ the time to serve the whole burst), kept beside
    ``run_paced`` because it shows how CPU per request turns into latency."""
    workers = 10
    extra = [arg for name, value in (headers or {}).items() for arg in ("-H", f"{name}: {value}")]
    out = subprocess.run(
        pinned_cmd(["hey", "-z", f"{duration}s", "-c", str(workers), "-q",
                    str(max(1, rate // workers)), *extra,
                    "-m", "POST", "-T", "application/json", "-d", body,
                    f"http://127.0.0.1:{port}/v1/chat/completions"], 0),
        capture_output=True, text=True, check=True, timeout=duration + 30).stdout
    found = dict(re.findall(r"(\d+)%% in ([\d.]+) secs".replace("%%", "%"), out))
    if "99" not in found:  # hey omits p99 below 100 responses: take the slowest then
        slowest = re.search(r"Slowest:\s+([\d.]+) secs", out)
        if slowest:
            found["99"] = slowest.group(1)
    if "50" not in found or "99" not in found:
        return float("nan"), float("nan")  # no response came back in time
    return float(found["50"]) * 1e3, float(found["99"]) * 1e3


def _ms(text: str) -> float:
    """wrk's latency figure ("1.23ms", "850.00us") in milliseconds."""
    number, unit = re.fullmatch(r"([\d.]+)(\w+)", text).groups()
    return float(number) * _UNITS[unit]
