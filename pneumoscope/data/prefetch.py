"""Start-up speed for ``pneumoscope train``: the split and the decoded pixels prepared in a forked process.

`Prefetch` runs `splits.split_samples` and decodes both splits while the parent process is still importing
PyTorch and building the model: that start-up is ~4 s of single-threaded work on which the other cores idle, and
the scan + split + decode of the shared data (~2 s on 2 cores) fits inside it. The decoded arrays come back
through an anonymous memory file (``memfd``) that the parent maps: nothing is copied or pickled, and nothing is
left on disk if either process dies. Linux only (fork + memfd); elsewhere `Prefetch.start` returns None and
training decodes in-process (the plain path, with identical results).
"""
from __future__ import annotations

import logging
import mmap
import multiprocessing
import os
import sys
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle

import numpy as np

from pneumoscope.data.cache import Decoded
from pneumoscope.data.splits import DATA_KEYS, Split, decode_samples, split_samples

log = logging.getLogger(__name__)


def _send_array(conn: Connection, a: np.ndarray) -> None:
    """Hand ``a`` to the other process as a memfd (the file descriptor travels over the socket, not the bytes)."""
    fd = os.memfd_create("pneumoscope-decoded")
    try:
        with open(fd, "wb", closefd=False) as f:
            f.write(memoryview(np.ascontiguousarray(a)).cast("B"))
        conn.send((a.shape, a.dtype.str))
        send_handle(conn, fd, os.getppid())
    finally:
        os.close(fd)


def _recv_array(conn: Connection) -> np.ndarray:
    shape, dtype = conn.recv()
    fd = recv_handle(conn)
    try:
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if n == 0:
            return np.zeros(shape, dtype)
        # private (copy-on-write) mapping: writable for torch.from_numpy, the pages themselves are shared
        buf = mmap.mmap(fd, n, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


def _child(cfg, size: int, conn: Connection) -> None:
    try:
        train, val, names, how = split_samples(cfg)
        conn.send(("split", (train, val, names, how)))
        workers = max(1, min(8, (os.cpu_count() or 1) - 1))  # one core stays with the parent's start-up
        for samples in (train, val):
            d = decode_samples(samples, size, cfg, progress=True, workers=workers)
            conn.send(("decoded", (d.ok, d.errors)))
            _send_array(conn, d.images)
    except Exception as e:  # noqa: BLE001 - every failure goes to the parent, which raises it
        conn.send(("error", e))
    finally:
        conn.close()


class Prefetch:
    """`split_samples` + decoding of both splits at ``size`` px in a forked process, started now.

    ``split()`` and ``decoded()`` wait for the child's results and raise the errors it met (the same
    exception types as in-process). Start it before importing torch (``pneumoscope train`` does).
    """

    def __init__(self, cfg, size: int) -> None:
        ctx = multiprocessing.get_context("fork")
        self.size = size
        self._key = tuple(getattr(cfg, k) for k in DATA_KEYS)
        self._conn, child_conn = ctx.Pipe(duplex=True)  # a socket pair: file descriptors can cross it
        self._proc = ctx.Process(target=_child, args=(cfg, size, child_conn), daemon=True, name="pneumoscope-data")
        self._proc.start()
        child_conn.close()
        self._split: Split | None = None

    @classmethod
    def start(cls, cfg, size: int | None) -> Prefetch | None:
        """A running Prefetch, or None where it cannot help or run: size unknown, under torchrun (each rank
        prepares its own data in-process), no fork/memfd (not Linux), or PNEUMOSCOPE_PREFETCH=0 in the environment."""
        if (not size or os.environ.get("PNEUMOSCOPE_PREFETCH", "1") == "0" or int(os.environ.get("WORLD_SIZE", "1")) > 1
                or not sys.platform.startswith("linux") or not hasattr(os, "memfd_create")):
            return None
        return cls(cfg, size)

    def matches(self, cfg) -> bool:
        """True when ``cfg`` asks for the same images and split as the config this was started with."""
        return self._key == tuple(getattr(cfg, k) for k in DATA_KEYS)

    def _recv(self, expect: str):
        try:
            kind, payload = self._conn.recv()
        except EOFError:
            self._proc.join(5)
            raise RuntimeError(f"the data-preparation process ended without a result (exit code "
                               f"{self._proc.exitcode}); run again with PNEUMOSCOPE_PREFETCH=0 to prepare the "
                               f"data in-process") from None
        if kind == "error":
            self.close()
            raise payload
        if kind != expect:
            raise RuntimeError(f"data-preparation process: expected {expect!r}, got {kind!r}")
        return payload

    def split(self) -> Split:
        if self._split is None:
            self._split = self._recv("split")
        return self._split

    def decoded(self) -> tuple[Decoded, Decoded]:
        """(train, val) decoded at ``self.size`` px, in the order of ``split()``."""
        self.split()
        out = []
        for _ in range(2):
            ok, errors = self._recv("decoded")
            out.append(Decoded(images=_recv_array(self._conn), ok=ok, errors=errors))
        self.close()
        return out[0], out[1]

    def close(self) -> None:
        """Stop the child (if it still runs) and release the connection."""
        if self._proc.is_alive():
            self._proc.terminate()
        self._proc.join(5)
        self._conn.close()
