"""Results on their way to the forward target, kept on disk until it has them: ``Outbox``.

Every SR and Secondary Capture is written to the outbox folder (``<SOPInstanceUID>.dcm``, atomically) before it is
sent, and removed only when the target answered Success. A target that is down, refuses the association or fails
a C-STORE leaves the files there; they are sent again at the next arrival, every ``retry_s`` seconds by a background
thread, and when the listener starts again. Nothing is lost by an outage, a crash or a restart.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from pneumoscope.dicom.results import send

log = logging.getLogger(__name__)

SUCCESS = 0x0000


class Outbox:
    def __init__(self, folder: str | Path, ae_title: str, host: str, port: int, calling_ae: str,
                 retry_s: float = 30.0) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.target = (ae_title, host, port)
        self.calling_ae, self.retry_s = calling_ae, retry_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def pending(self) -> list[Path]:
        return sorted(self.folder.glob("*.dcm"), key=lambda p: (p.stat().st_mtime_ns, p.name))

    def put(self, datasets: list[Dataset]) -> list[Path]:
        """Write ``datasets`` to the outbox (fsynced, then renamed into place)."""
        paths = []
        for ds in datasets:
            path = self.folder / f"{ds.SOPInstanceUID}.dcm"
            tmp = path.with_suffix(".tmp")
            with open(tmp, "wb") as f:
                ds.save_as(f, enforce_file_format=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            paths.append(path)
        return paths

    def flush(self) -> dict:
        """Send everything pending in one association; remove what the target stored. Counts sent / still pending."""
        with self._lock:
            files = self.pending()
            if not files:
                return {"sent": 0, "pending": 0}
            datasets = [pydicom.dcmread(p) for p in files]
            statuses = send(datasets, *self.target, self.calling_ae)
            sent = 0
            for path, status in zip(files, statuses):
                if status == SUCCESS:
                    path.unlink()
                    sent += 1
            left = len(files) - sent
            aet, host, port = self.target
            if left:
                log.warning("forward to %s@%s:%d: %d result(s) kept in %s, retried every %g s", aet, host, port, left,
                            self.folder, self.retry_s)
            else:
                log.info("forwarded %d result(s) to %s@%s:%d", sent, aet, host, port)
            return {"sent": sent, "pending": left}

    def start(self) -> None:
        """Retry in the background (and once now, for what an earlier run left)."""
        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.flush()
                except Exception:  # noqa: BLE001 - the retry thread must outlive one bad file or network error
                    log.exception("outbox retry failed; trying again in %g s", self.retry_s)
                self._stop.wait(self.retry_s)

        self._thread = threading.Thread(target=loop, name="dicom-outbox", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
