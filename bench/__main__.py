"""kvgate's benchmarks behind one command: ``python -m bench <study> [options]``.

The study's own options follow its name (``python -m bench routing --help``); the study's
module is imported only once chosen, so ``--help`` here stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from bench.studies import STUDIES


def build_parser() -> argparse.ArgumentParser:
    """The top level: a study name (listed with one line each); the rest goes to the study."""
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="kvgate's benchmarks, one study per command.",
        epilog="Options after the study's name are the study's: python -m bench STUDY --help")
    sub = parser.add_subparsers(dest="study", metavar="STUDY", required=True)
    for name, line in STUDIES.items():
        sub.add_parser(name, help=line, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    study = build_parser().parse_args(argv[:1]).study
    module = importlib.import_module(f"bench.studies.{study}")
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
