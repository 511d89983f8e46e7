"""The one thread that runs the model: requests queue their images, the thread batches whatever is waiting into
one forward pass (and Grad-CAM when asked), so concurrent requests share the model instead of fighting over the
CPU cores. No added wait when idle, bigger batches under load. Used by the service (serve/app.py) and the DICOM
node (dicom/listen.py) alike; the Grad-CAM function is handed in (``trust.explain.heatmaps``), so this room does
not import the one above it."""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from pneumoscope.inference.assess import heatmap_shown
from pneumoscope.inference.prediction import Prediction

log = logging.getLogger(__name__)


@dataclass
class _Job:
    images: list[np.ndarray]
    heatmaps: bool
    quality: list[list[str]] | None
    future: Future = field(default_factory=Future)


@dataclass
class Scored:
    """One image of a batch: its prediction and, when asked for and shown (HEATMAP_RULE), its Grad-CAM map."""

    prediction: Prediction
    heat: np.ndarray | None = None
    heat_error: str | None = None


class ModelWorker:
    """The one thread that touches the model. ``submit`` queues a request's images; the worker takes every job
    waiting in the queue (up to ``max_batch`` images) and runs them as one batch: no added wait when idle,
    bigger batches under load."""

    def __init__(self, predictor, max_batch: int = 32,
                 heatmap_fn: Callable[..., np.ndarray] | None = None) -> None:
        """``heatmap_fn(predictor, images_u8) -> (N, S, S)`` maps (``trust.explain.heatmaps``); None: no maps."""
        self.predictor = predictor
        self.max_batch = max_batch
        self.heatmap_fn = heatmap_fn
        self._q: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, images: list[np.ndarray], heatmaps: bool = False,
               quality: list[list[str]] | None = None) -> Future:
        """A future of one ``Scored`` per image: the ``Prediction``, its Grad-CAM map ``heat`` (S, S) or None, and
        ``heat_error`` when the map could not be computed."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pneumoscope-model", daemon=True)
                self._thread.start()
        job = _Job(images, heatmaps, quality)
        self._q.put(job)
        return job.future

    def close(self) -> None:
        with self._lock:
            if self._thread is not None:
                self._q.put(None)
                self._thread.join(timeout=30)
                self._thread = None

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            jobs, n = [job], len(job.images)
            while n < self.max_batch:
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._q.put(None)  # stop after this batch
                    break
                jobs.append(nxt)
                n += len(nxt.images)
            jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]  # drop cancelled requests
            if not jobs:
                continue
            try:
                per_job = self._compute(jobs)
            except Exception as e:  # noqa: BLE001 - handed to the waiting requests (500); the worker must live on
                log.exception("prediction failed for a batch of %d image(s)", sum(len(j.images) for j in jobs))
                for j in jobs:
                    j.future.set_exception(e)
                continue
            for j, r in zip(jobs, per_job):
                j.future.set_result(r)

    def _compute(self, jobs: list[_Job]) -> list[list[Scored]]:
        images = [im for j in jobs for im in j.images]
        quality = [q for j in jobs for q in (j.quality or [None] * len(j.images))]
        results = [Scored(p) for p in self.predictor.predict(images, quality=quality)]
        owners = [j for j in jobs for _ in j.images]
        # a map only for a film labelled PNEUMONIA (inference.assess.HEATMAP_RULE)
        wanted = [i for i, j in enumerate(owners) if j.heatmaps and heatmap_shown(results[i].prediction.label or "")]
        if wanted and self.heatmap_fn is not None:
            try:
                for i, m in zip(wanted, self.heatmap_fn(self.predictor, np.stack([images[i] for i in wanted]))):
                    results[i].heat = m
            except Exception as e:  # noqa: BLE001 - a missing heatmap must not fail the prediction itself
                log.exception("Grad-CAM failed for a batch of %d image(s)", len(wanted))
                for i in wanted:
                    results[i].heat_error = f"heatmap unavailable ({type(e).__name__}: {e})"
        out, start = [], 0
        for j in jobs:
            out.append(results[start:start + len(j.images)])
            start += len(j.images)
        return out
