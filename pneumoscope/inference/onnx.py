"""ONNX export and an ONNX Runtime backend: ``export_onnx(checkpoint, "model.onnx")``, ``OnnxBackend("model.onnx")``.

The exported graph takes the **uint8** image batch ``image_u8`` (B, 1, S, S), dynamic B, exactly what
``Predictor.prepare`` produces, and does the normalisation ``(x / 255 - mean) / std`` itself; it returns ``logits``
(B, num_classes) before the sigmoid/softmax, like the PyTorch model. So a consumer needs no preprocessing code
beyond "decode to grey and resize to S x S", and cannot get the mean/std wrong.

Everything else a predictor needs travels inside the file as ONNX ``metadata_props`` (each value a JSON string):
``pneumoscope.preprocess``, ``pneumoscope.label_names``, ``pneumoscope.threshold``, ``pneumoscope.temperature``,
``pneumoscope.calibration_bias``,
``pneumoscope.arch``, ``pneumoscope.source_sha256`` (of the checkpoint), ``pneumoscope.version``,
``pneumoscope.input``; an int8 model (``quantize_onnx``) adds ``pneumoscope.quantization``. See docs/speed.md.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from pneumoscope import __version__
from pneumoscope.config import parse_tta
from pneumoscope.data.digest import file_digest
from pneumoscope.data.folders import expand_paths
from pneumoscope.data.intake import load_uint8
from pneumoscope.errors import CheckpointError
from pneumoscope.inference.predictor import Predictor
from pneumoscope.inference.runtime import onnx_cache_dir, quiet_exporter
from pneumoscope.inference.tta import with_views
from pneumoscope.models.checkpoint import load_checkpoint, model_from_checkpoint
from pneumoscope.models.preprocess import Preprocess

log = logging.getLogger(__name__)

INPUT_NAME = "image_u8"
OUTPUT_NAME = "logits"
META_PREFIX = "pneumoscope."
INPUT_DOC = "uint8 (B, 1, S, S) grey image, 0 = black; normalised inside the graph"


def _wrap_uint8(model, pre):
    """``model`` behind a uint8 input: x -> model((x / 255 - mean) / std), the same arithmetic as inference.runtime.to_input."""

    class Uint8Input(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.register_buffer("mean", torch.tensor(pre.mean, dtype=torch.float32).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(pre.std, dtype=torch.float32).view(1, -1, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model((x.float() / 255 - self.mean) / self.std)

    return Uint8Input().eval()


def export_model(model, preprocess, onnx_path: str | Path, *, opset: int = 18, metadata: dict | None = None) -> Path:
    """Export an ``nn.Module`` taking normalised float input to ``onnx_path`` with a uint8 input (see module doc).

    ``metadata``: extra key -> JSON-able value, stored as ``pneumoscope.<key>`` metadata_props.
    The file is written atomically (temporary file, then rename).
    """

    pre = preprocess
    model = copy.deepcopy(model).float().eval().to(memory_format=torch.contiguous_format)  # caller's model untouched
    wrapped = _wrap_uint8(model, pre)
    s = pre.input_size
    example = torch.randint(0, 256, (2, pre.channels, s, s), dtype=torch.uint8)  # batch 2: not specialised to 1
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.onnx.export(wrapped, (example,), dynamo=True, opset_version=opset, verbose=False,
                                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                dynamic_shapes=({0: batch},))
    meta = {"preprocess": pre.to_dict(), "version": __version__, "input": INPUT_DOC, **(metadata or {})}
    program.model.metadata_props.update({META_PREFIX + k: json.dumps(v) for k, v in meta.items()})
    program.model.producer_name = "pneumoscope"
    program.model.producer_version = __version__
    path = Path(onnx_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    program.save(tmp, external_data=False)
    os.replace(tmp, path)
    return path


def export_onnx(checkpoint: str | Path, onnx_path: str | Path, opset: int = 18) -> Path:
    """Export a pneumoscope checkpoint (``best.pt``) to ONNX with its preprocessing, labels, threshold,
    temperature, architecture and checksum embedded; logs the largest logit difference to PyTorch."""

    ckpt = load_checkpoint(checkpoint)
    views = parse_tta((ckpt.get("config") or {}).get("tta", ""))
    model = with_views(model_from_checkpoint(ckpt), views)  # the test-time views are part of the exported graph
    pre = Preprocess.from_dict(ckpt["preprocess"])
    meta = {"label_names": list(ckpt["label_names"]), "threshold": ckpt.get("threshold"),
            "temperature": ckpt.get("temperature"), "calibration_bias": ckpt.get("calibration_bias", 0.0),
            "arch": ckpt["arch"], "tta": list(views),
            "source_sha256": file_digest(checkpoint), "source_name": Path(checkpoint).name, "epoch": ckpt.get("epoch")}
    path = export_model(model, pre, onnx_path, opset=opset, metadata=meta)

    # one check on a random batch: the file must compute what the checkpoint computes
    x = np.random.default_rng(0).integers(0, 256, (3, pre.channels, pre.input_size, pre.input_size), dtype=np.uint8)
    with torch.no_grad():
        ref = _wrap_uint8(model, pre)(torch.from_numpy(x)).numpy()
    diff = float(np.abs(OnnxBackend(path).logits(x) - ref).max())
    log.info("exported %s -> %s (%.1f MB); max |logit difference| to PyTorch on a random batch: %.2e",
             checkpoint, path, path.stat().st_size / 1e6, diff)
    return path


def quantize_onnx(onnx_path: str | Path, out_path: str | Path, calibration_u8) -> Path:
    """Static int8 quantisation of an exported model, calibrated on real images: about 2x the images/s on CPUs with
    AVX512-VNNI/AVX-VNNI (int8 dot products). On the fully trained seed_cnn: probabilities within 0.026 of fp32 and
    the same labels on 600 images; check on your own validation data before deploying it.

    ``calibration_u8``: uint8 (N, S, S) or (N, 1, S, S), e.g. 64 training images prepared like ``Predictor.prepare``.
    QDQ format, int8 weights per output channel, uint8 activations (min/max calibration). Metadata is kept.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    x = np.ascontiguousarray(calibration_u8, dtype=np.uint8)
    x = x[:, None] if x.ndim == 3 else x
    batches = [{INPUT_NAME: x[i:i + 8]} for i in range(0, len(x), 8)]

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(batches)

        def get_next(self):
            return next(self.it, None)

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pneumoscope-quant-") as tmp:
        pre, q = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(onnx_path), str(pre))
        quantize_static(str(pre), str(q), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        model = onnx.load(str(q))
        entry = model.metadata_props.add()
        entry.key = META_PREFIX + "quantization"
        entry.value = json.dumps({"method": "static int8 QDQ, per-channel weights, uint8 activations",
                                  "calibration_images": len(x), "source": Path(onnx_path).name})
        tmp_out = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        onnx.save(model, str(tmp_out))
        os.replace(tmp_out, out)
    return out


def calibration_images(folder: str | Path, size: int, n: int = 64, seed: int = 0):
    """``n`` images (seeded random choice) from the image files under ``folder``, as uint8 (n, size, size)."""

    paths = expand_paths([folder]) if Path(folder).is_dir() else []
    if not paths:
        raise CheckpointError(f"no image files under {folder} to calibrate the int8 model on; pass a folder of X-rays")
    pick = np.random.default_rng(seed).choice(len(paths), size=min(n, len(paths)), replace=False)
    return np.stack([load_uint8(paths[i], size) for i in sorted(pick)])


class OnnxBackend:
    """ONNX Runtime inference of an exported model: ``.logits(batch_u8)`` like ``Predictor.logits``.

    ``threads``: intra-op threads (0 = ONNX Runtime's default, one per physical core). ``max_batch``: larger
    batches run in chunks of this size; the activations of a chunk of 8 stay in cache, and on the development CPU
    chunks of 8 gave ~20 % more images/s than one batch of 64 (docs/speed.md).
    """

    def __init__(self, onnx_path: str | Path, threads: int = 0, max_batch: int = 8) -> None:
        import onnxruntime as ort
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise CheckpointError(f"ONNX model {self.path} not found: create it with pneumoscope export --checkpoint CKPT "
                                  f"--onnx {self.path}")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # no busy-waiting between runs: spinning threads starved the service's decoding and database threads
        # (model stage p50 239 -> see docs/service.md) and the OOD feature session on 2 cores
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3  # errors only
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except (ort_errors.Fail, ort_errors.InvalidGraph, ort_errors.InvalidProtobuf, ort_errors.InvalidArgument,
                ort_errors.NotImplemented) as e:
            raise CheckpointError(f"{self.path} is not a loadable ONNX model ({type(e).__name__}: {e}); export it again") from e
        raw = self.session.get_modelmeta().custom_metadata_map
        self.metadata = {k[len(META_PREFIX):]: json.loads(v) for k, v in raw.items() if k.startswith(META_PREFIX)}
        if "preprocess" not in self.metadata:
            raise CheckpointError(f"{self.path} has no pneumoscope metadata (pneumoscope.preprocess): export it with "
                                  "pneumoscope export")
        self.preprocess = Preprocess.from_dict(self.metadata["preprocess"])
        self.label_names = tuple(self.metadata.get("label_names") or ("NORMAL", "PNEUMONIA"))
        self.threshold = self.metadata.get("threshold")
        self.temperature = self.metadata.get("temperature")
        self.calibration_bias = float(self.metadata.get("calibration_bias") or 0.0)
        self.input_name = self.session.get_inputs()[0].name
        self.max_batch = max(1, int(max_batch))

    def logits(self, batch_u8):
        """uint8 (B, S, S) or (B, 1, S, S) -> float32 logits (B, num_classes)."""

        x = np.ascontiguousarray(batch_u8, dtype=np.uint8)
        if x.ndim == 3:
            x = x[:, None]
        s = self.preprocess.input_size
        if x.ndim != 4 or x.shape[1:] != (self.preprocess.channels, s, s) or len(x) == 0:
            raise ValueError(f"{self.path}: input of shape {x.shape}; expected (B>0, {self.preprocess.channels}, {s}, {s}) uint8")
        x = np.ascontiguousarray(self.preprocess.standardise(x))  # as in training (data/intensity.py)
        out = [self.session.run([OUTPUT_NAME], {self.input_name: x[i:i + self.max_batch]})[0]
               for i in range(0, len(x), self.max_batch)]
        return out[0] if len(out) == 1 else np.concatenate(out)


EXPORT_ERRORS = (RuntimeError, ValueError, TypeError, NotImplementedError, AssertionError, OSError)


def cached_backend(model, preprocess, key: str, threads: int = 0, tolerance: float = 1e-4,
                   views: tuple[str, ...] = ()) -> OnnxBackend | None:
    """An ONNX Runtime copy of ``model`` with its test-time ``views`` inside the graph (a checkpoint's, ``key`` = its
    sha256): exported once into ``cache_dir()`` and checked then against PyTorch on a random batch (max |logit
    difference| <= ``tolerance``). None when the model cannot be exported or does not agree: the caller keeps
    PyTorch (and says so)."""
    model = with_views(model, views)
    path = onnx_cache_dir() / f"{key}{''.join('-' + v for v in views)}-{__version__}.onnx"
    if not path.is_file():
        log.info("exporting the model to ONNX Runtime once (a few seconds; kept in %s)", path.parent)
        try:
            with quiet_exporter():
                export_model(model, preprocess, path)
        except EXPORT_ERRORS as e:
            log.warning("ONNX export failed (%s: %s): predicting with PyTorch", type(e).__name__, str(e)[:200])
            return None
        s = preprocess.input_size
        x = np.random.default_rng(0).integers(0, 256, (3, preprocess.channels, s, s), dtype=np.uint8)
        with torch.no_grad():
            ref = _wrap_uint8(copy.deepcopy(model).float().eval(), preprocess)(
                torch.from_numpy(np.ascontiguousarray(preprocess.standardise(x)))).numpy()
        diff = float(np.abs(OnnxBackend(path, threads).logits(x) - ref).max())
        if not diff <= tolerance:
            log.warning("the ONNX copy differs from PyTorch by %.2e > %.0e: predicting with PyTorch", diff, tolerance)
            path.unlink(missing_ok=True)
            return None
    return OnnxBackend(path, threads)


def load_onnx_predictor(onnx_path: str | Path, threads: int = 0):
    """A ``Predictor`` (same ``prepare``/``predict``) whose logits come from ONNX Runtime."""

    backend = OnnxBackend(onnx_path, threads)
    threshold = backend.threshold
    if threshold is None:
        log.warning("%s stores no decision threshold; using 0.5", onnx_path)
        threshold = 0.5
    m = backend.metadata
    info = {"name": (m.get("arch") or {}).get("name"), "checkpoint": str(onnx_path), "version": m.get("version"),
            "checksum": "sha256:" + str(m.get("source_sha256")), "epoch": m.get("epoch"), "threshold": float(threshold),
            "temperature": backend.temperature, "calibration_bias": backend.calibration_bias,
            "label_names": list(backend.label_names), "backend": "onnxruntime"}
    return Predictor(model=None, preprocess=backend.preprocess, label_names=backend.label_names,
                     threshold=float(threshold), temperature=backend.temperature,
                     calibration_bias=backend.calibration_bias, info=info, backend=backend, threads=threads,
                     tta=parse_tta(m.get("tta") or ""))
