"""Every option of every sub-command checked in ONE place, before any model loads or any file is created.

``RANGES`` holds the bounds of the numeric options outside the training config (the training keys are checked by
``config.check_value`` against ``config.BOUNDS``, the same table as YAML files); ``check_args`` also checks
devices, hosts and ports, and that a port can be bound. A value out of range is a ``ConfigError`` naming the
option, the value and what is allowed (exit code 2), never a traceback or a server that refuses every request.
Torch-free: ``pneumoscope --help`` stays fast.
"""
from __future__ import annotations

import argparse
import errno
import ipaddress
import math
import re
import socket

from pneumoscope.config import BOUNDS, check_value
from pneumoscope.errors import ConfigError

# dest -> inclusive (lo, hi); a (command, dest) key overrides the plain one for that sub-command
RANGES: dict = {
    "port": (1, 65535), "max_upload_mb": (0.01, 4096.0), "max_connections": (1, 100_000), "alpha": (1e-6, 0.5),
    "gradcam_n": (0, 100_000), "hours": (0.01, 24.0 * 366), "opset": (13, 23), "seed": (0, 2**32 - 1),
    "limit": (0, 100_000_000), ("serve", "workers"): (1, 64), ("serve", "threads"): (0, 256), "retry_seconds": (0.1, 86_400.0),
}
DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d{1,2})?)$")
HOST = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


def option(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_range(dest: str, value, lo, hi) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not lo <= value <= hi:
        raise ConfigError(f"{option(dest)} {value!r} is invalid: allowed is {lo:g} to {hi:g}")


def check_device(value: str) -> None:
    if not DEVICE.match(str(value)):
        raise ConfigError(f"--device {value!r} is invalid: use auto, cpu, cuda or cuda:N (a GPU index)")


def check_host(value: str) -> None:
    try:
        ipaddress.ip_address(value)
        return
    except ValueError:
        pass
    if not HOST.match(str(value)):
        raise ConfigError(f"--host {value!r} is invalid: use an IP address (127.0.0.1, 0.0.0.0, ::1) or a host name")


def check_port_free(host: str, port: int) -> None:
    """ConfigError when ``host:port`` cannot be bound now (in use, or not an address of this machine)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            why = ("it is in use by another program: stop it or choose another --port" if e.errno == errno.EADDRINUSE
                   else f"{e.strerror or e}: choose an address of this machine with --host")
            raise ConfigError(f"cannot listen on {host}:{port}: {why}") from None
        except (OverflowError, socket.gaierror) as e:
            raise ConfigError(f"cannot listen on {host}:{port}: {e}") from None


def check_args(args: argparse.Namespace) -> None:
    """Check every option of the parsed command line (see the module docstring)."""
    command = getattr(args, "command", None)
    for dest, value in sorted(vars(args).items()):
        if value is None or callable(value):
            continue
        bounds = RANGES.get((command, dest)) or RANGES.get(dest)
        if bounds is not None:
            check_range(dest, value, *bounds)
        elif dest in BOUNDS and isinstance(value, (int, float)):
            check_value(dest, value, where="option")
        if dest == "device":
            check_device(value)
        elif dest == "host":
            check_host(value)
