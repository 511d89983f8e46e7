"""The `pneumoscope` command: a thin argparse layer over the Python API.

One module per group of sub-commands, each with ``register(sub)``; every handler imports its room lazily, so
``pneumoscope --help`` loads neither torch nor FastAPI.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from pneumoscope import __version__
from pneumoscope.cli import adapt, data, dicom, experiment, inference, serve, train
from pneumoscope.cli.options import check_args
from pneumoscope.errors import PneumoscopeError

log = logging.getLogger("pneumoscope")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pneumoscope", description="Pneumonia detection on chest X-rays.")
    p.add_argument("--version", action="version", version=f"pneumoscope {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (data, train, adapt, inference, experiment, serve, dicom):
        group.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        check_args(args)  # every option, before any model loads or file is created (cli/options.py)
        return int(args.func(args) or 0)
    except PneumoscopeError as e:
        log.error("%s", e)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130


def run() -> None:
    """Console entry point (``pneumoscope ...``, ``python -m pneumoscope ...``): `main`, then exit without the
    interpreter's teardown. Once torch, scikit-learn, numba and matplotlib are loaded, freeing every module's
    objects takes ~1 s (measured on a 2-epoch train) and does nothing a finished command needs (mypy exits the
    same way); log handlers and streams are flushed first. Errors and torchrun workers exit normally."""
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # let the process group tear down
        raise SystemExit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
