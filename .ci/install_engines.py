"""Installs the real engines of the opt-in suite, each into its own virtualenv.

Reads .ci/engine-packages.txt (its header says the format). Each engine lives in
<root>/<engine> (default .kvgate/engines), so its torch and transformers never meet kvgate's or
another engine's; the suite names each interpreter in `local.engines.<Engine>.python`. An
engine whose lines have not changed since its last complete install is left alone. Installs run
one after another under `nice`, as they are long and the machine may be shared.

    python3 .ci/install_engines.py [--root DIR] [engine ...]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# A leading NAME=VALUE word (upper-case name, one '=') sets the environment of that pip call;
# `pkg==1.0` is a requirement, not a variable.
ENV_WORD = re.compile(r"([A-Z_][A-Z0-9_]*)=(?!=)(.*)", re.S)


def read_packages(path: Path) -> dict[str, list[list[str]]]:
    """engine -> its pip argument lists, in file order."""
    steps: dict[str, list[list[str]]] = {}
    for line in path.read_text().splitlines():
        words = shlex.split(line, comments=True)
        if words:
            steps.setdefault(words[0], []).append(words[1:])
    return steps


def split_env(words: list[str]) -> tuple[dict[str, str], list[str]]:
    env: dict[str, str] = {}
    while words and (match := ENV_WORD.fullmatch(words[0])):
        env[match[1]], words = match[2], words[1:]
    return env, words


def install(engine: str, steps: list[list[str]], root: Path) -> None:
    venv = root / engine
    stamp = venv / ".kvgate-engine-stamp"
    digest = hashlib.sha256(repr(steps).encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        print(f"engines: {engine}: up to date ({venv})", flush=True)
        return
    started = time.monotonic()
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    for words in steps:
        env, args = split_env(words)
        command = (pip + ["uninstall", "-y", *args[1:]] if args[:1] == ["uninstall"]
                   else pip + ["install", *args])
        print(f"engines: {engine}: {shlex.join(command[2:])}", flush=True)
        subprocess.run(["nice", "-n", "19", *command], check=True, env=os.environ | env)
    stamp.write_text(digest)
    print(f"engines: {engine}: installed in {time.monotonic() - started:.0f} s ({venv})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=".kvgate/engines", help="where the virtualenvs go")
    parser.add_argument("--packages", default=str(HERE / "engine-packages.txt"))
    parser.add_argument("engines", nargs="*", help="only these (default: all in the file)")
    args = parser.parse_args()
    steps = read_packages(Path(args.packages))
    unknown = set(args.engines) - set(steps)
    if unknown:
        parser.error(f"unknown engine(s) {', '.join(sorted(unknown))}; known: {', '.join(steps)}")
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    for engine in args.engines or list(steps):
        install(engine, steps[engine], root)


if __name__ == "__main__":
    main()
