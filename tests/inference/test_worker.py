"""inference/worker.py: the one model thread of the service and the DICOM node batches concurrent requests."""
import threading
import time

import numpy as np
import pydicom
import pytest

from pneumoscope.inference.prediction import Prediction
from pneumoscope.inference.worker import ModelWorker


def test_model_worker_batches_concurrent_requests_and_survives_errors():
    gate, entered, seen = threading.Event(), threading.Event(), []

    class Fake:
        def predict(self, items, **kw):
            seen.append(len(items))
            if len(seen) == 1:
                entered.set()
                gate.wait(10)  # hold the worker while the next jobs queue up
            if any(int(i[0, 0]) == 255 for i in items):
                raise RuntimeError("boom")
            return [Prediction(path="array", probability=float(i[0, 0]) / 255) for i in items]

    w = ModelWorker(Fake())
    img = lambda v: np.full((4, 4), v, np.uint8)  # noqa: E731
    first = w.submit([img(1)])
    assert entered.wait(10)
    gone = w.submit([img(7)])
    later = [w.submit([img(2), img(3)]), w.submit([img(4)]), w.submit([img(5)])]
    assert gone.cancel()  # its client went away: the worker skips it
    gate.set()
    assert first.result(10)[0].prediction.probability == pytest.approx(1 / 255)
    assert [[x.prediction.probability * 255 for x in f.result(10)] for f in later] == [[2, 3], [4], [5]]
    assert seen == [1, 4]  # the three queued requests ran as one batch of 4 images
    assert gone.cancelled()
    bad = w.submit([img(255)])
    with pytest.raises(RuntimeError, match="boom"):
        bad.result(10)
    assert w.submit([img(6)]).result(10)[0].prediction.probability == pytest.approx(6 / 255)  # still alive
    w.close()


def test_the_dicom_node_goes_through_the_model_worker_and_batches_concurrent_associations(tiny_checkpoint, dicom_dir,
                                                                                          tmp_path):
    """Datasets that arrive together (several associations) share one batch of the node's ModelWorker; the stored
    answer equals `predict` on the file."""
    from pneumoscope.dicom.listen import Pipeline
    from pneumoscope.inference.loader import load

    pred = load(tiny_checkpoint, device="cpu")
    files = [dicom_dir / f for f in ("chest_dx_nih_no_finding.dcm", "chest_dx_nih_cardiomegaly.dcm",
                                     "chest_cr_jpeg_baseline_siim.dcm")]
    pipeline = Pipeline(str(tmp_path / "dicom.db"), pred, heatmaps=False)
    batches, real, gate = [], pred.predict, threading.Event()

    def held(items, **kw):  # the first call waits until the others queued behind it
        batches.append(len(items))
        if len(batches) == 1:
            gate.wait(10)
        return real(items, **kw)

    pred.predict = held
    try:
        first = threading.Thread(target=lambda: pipeline.process(pydicom.dcmread(files[0]), "1.2.3.1", "A"))
        first.start()
        while not batches:
            time.sleep(0.01)
        rest = [threading.Thread(target=lambda f=f, i=i: pipeline.process(pydicom.dcmread(f), f"1.2.3.{i}", "B"))
                for i, f in enumerate(files[1:], 2)]
        for t in rest:
            t.start()
        while pipeline.worker._q.qsize() < len(rest):
            time.sleep(0.01)
        gate.set()
        for t in [first, *rest]:
            t.join(30)
        assert batches == [1, len(rest)]  # the associations that waited ran as one batch
        stored = sorted(r["probability"] for r in pipeline.db.list_studies())
    finally:
        pred.predict = real
        pipeline.close()
    assert stored == pytest.approx(sorted(r.probability for r in pred.predict(files)), abs=1e-6)
