"""Grad-CAM heatmaps: where in the X-ray the pneumonia score comes from. ``pneumoscope explain``.

MONAI's ``monai.visualize.GradCAM`` on the model's ``gradcam_layer`` (see ``models.py``), for the *pneumonia
score*: the single logit of a binary model; for a ternary model the pneumonia log-odds
``logsumexp(z_bacterial, z_viral) - z_normal``, whose sigmoid is exactly ``1 - softmax[NORMAL]``, the score that
``predict`` reports (``class_idx`` picks one class logit instead).

Grad-CAM runs on a private fp32 copy of the model in eval mode and contiguous (NCHW) memory format: MONAI's hooks
are never removed and its ``view`` calls fail on channels_last gradients, so the predictor's model is left exactly
as it was (mode, hooks, memory format, in-place flags). cuDNN cannot run an RNN backward pass in eval mode, so on
CUDA a model with a GRU (``cnn_rnn``) is explained with cuDNN switched off (native kernels, same result);
on CPU nothing special is needed.

A heatmap is float32 (S, S) at the model input size in [0, 1], divided by its maximum (0 = no positive evidence
for pneumonia). It shows what drives the score, not where the disease is: see docs/trust.md.
"""
from __future__ import annotations

import copy
import io
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from monai.visualize import GradCAM
from PIL import Image
from torch import nn

from pneumoscope import __version__
from pneumoscope.data.folders import expand_paths
from pneumoscope.data.images import os_error_message, read_image, to_uint8
from pneumoscope.errors import ImageReadError, PneumoscopeError
from pneumoscope.inference.assess import HEATMAP_RULE, NOT_ASSESSED, heatmap_shown
from pneumoscope.inference.loader import load
from pneumoscope.inference.runtime import normalize
from pneumoscope.models.efficientnet import forward_until
from pneumoscope.models.ensemble import Ensemble
from pneumoscope.models.layers import LinearHead

log = logging.getLogger(__name__)  # torch is imported inside the functions: `pneumoscope --help` stays instant


def pneumonia_logit(model, class_idx: int | None = None):
    """``model`` wrapped to one output: the binary logit, the pneumonia log-odds of a multi-class model
    (``logsumexp(z[1:]) - z[0]``, sigmoid = 1 - softmax[0]), or the logit of class ``class_idx``."""

    class PneumoniaLogit(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z = self.model(x).float()
            if class_idx is not None:
                return z[:, class_idx:class_idx + 1]
            if z.shape[1] == 1:
                return z
            return (torch.logsumexp(z[:, 1:], dim=1) - z[:, 0]).unsqueeze(1)

    return PneumoniaLogit()


class _MemberLogit(nn.Module):
    """Member ``i``'s uncalibrated pneumonia logit of an ensemble's input (no clamping: a confident member keeps its
    gradient)."""

    def __init__(self, ensemble, i: int) -> None:
        super().__init__()
        self.ensemble, self.i = ensemble, i

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ensemble.member_logit(x, self.i)


def _unit_max(cam):
    """Per-image division by the maximum (Grad-CAM maps are >= 0 after its ReLU); an all-zero map stays zero."""

    m = cam.flatten(1).amax(1).view(-1, *([1] * (cam.dim() - 1)))
    return torch.where(m > 0, cam / m.clamp_min(1e-12), torch.zeros_like(cam))


def heatmaps(predictor, images_u8: np.ndarray, class_idx: int | None = None) -> np.ndarray:
    """Grad-CAM maps (N, S, S) float32 in [0, 1] for uint8 images (N, S, S) at the model input size."""

    x_u8 = np.asarray(images_u8)
    if x_u8.ndim != 3 or x_u8.dtype != np.uint8:
        raise ValueError(f"heatmaps needs uint8 images (N, S, S), got {x_u8.dtype} {x_u8.shape}")
    if class_idx is None and (fast := closed_form(predictor)) is not None:
        return fast(x_u8)
    layer = getattr(predictor.model, "gradcam_layer", None)
    if not layer:
        raise ValueError(f"{type(predictor.model).__name__} has no gradcam_layer; build it with models.create_model")
    # a private copy: MONAI's hooks stay on it, the predictor's model keeps its mode, hooks and memory format
    model = copy.deepcopy(predictor.model).float().to(memory_format=torch.contiguous_format).eval()
    # an ensemble (models/ensemble.py) names one layer per member: each member's map is its own Grad-CAM (the
    # ensemble's input, the member's raw logit), each at the input size, and the maps are averaged. The ensemble's
    # logit is a per-image increasing function of each member's, so its gradient at a member's layer is the member's
    # own times a positive factor per image, which the per-image division by the maximum removes: the same maps as
    # explaining the ensemble's output (tests/studies/test_ensemble.py), one member's passes each instead of all.
    # Except where that output saturates (mean probability clamped at 1 - 1e-6, or a member's sigmoid at 1 in
    # float32): its gradient is 0 there and its map was blank; the member's own logit still gives a map.
    # Other models with several ``gradcam_layers`` (adapt's FeatureHead) have their output explained at each layer.
    layers = list(getattr(model, "gradcam_layers", None) or [layer])
    if isinstance(model, Ensemble):
        targets = [(pneumonia_logit(_MemberLogit(model, i), class_idx).eval(), "model.ensemble." + name)
                   for i, name in enumerate(layers)]
    else:
        net = pneumonia_logit(model, class_idx).eval()
        targets = [(net, "model." + name) for name in layers]
    dev = predictor.device
    x = torch.from_numpy(np.array(predictor.preprocess.standardise(x_u8), copy=True)).unsqueeze(1).to(dev).float().div_(255)
    x = normalize(x, predictor.preprocess).contiguous().requires_grad_(True)
    has_rnn = any(isinstance(m, nn.RNNBase) for m in model.modules())
    maps = []
    for net, target in targets:
        cam = GradCAM(nn_module=net, target_layers=target, postprocessing=_unit_max)
        with torch.enable_grad(), torch.backends.cudnn.flags(enabled=not (has_rnn and dev.type == "cuda")):
            maps.append(cam(x=x, class_idx=0).detach().float())
    out = maps[0] if len(maps) == 1 else _unit_max(torch.stack(maps).mean(0))
    return out[:, 0].cpu().numpy().astype(np.float32)


def closed_form(predictor):
    """Grad-CAM without a backward pass, for a binary EfficientNet-Lite classifier explained at its last conv layer
    (``backbone._bn1``, then ReLU6, average pooling and one linear unit: the default model). There the gradient of
    the logit with respect to an activation a_kij is w_k * 1[0 < a_kij < 6] / (h w), so Grad-CAM's channel weights
    are w_k * mean(1[0 < a_k < 6]) / (h w), computed from the activations alone; these come from an ONNX Runtime
    copy of the network up to that layer (exported once per checkpoint). Equal to MONAI's GradCAM within 1e-5, except a
    map where an activation within ONNX Runtime's float difference (~1e-4) of 0 or 6 flips its gate: then within
    2e-3 (tests/trust/test_explain.py); ~10x faster on the CPU. None when the model is not of that shape."""
    model = predictor.model
    if model is None or predictor.device.type != "cpu" or not isinstance(getattr(model, "head", None), LinearHead):
        return None
    b = getattr(model, "backbone", None)
    if not (hasattr(b, "_bn1") and isinstance(getattr(b, "_swish", None), nn.ReLU6) and isinstance(b._fc, nn.Identity)
            and isinstance(b._dropout, nn.Identity) and not b._global_params.local_pooling
            and model.head.fc.out_features == 1 and list(getattr(model, "gradcam_layers", None) or
                                                         [model.gradcam_layer]) == ["backbone._bn1"]):
        return None
    session = _activation_session(predictor)
    if session is None:
        return None
    w = model.head.fc.weight.detach().float()[0].view(1, -1, 1, 1)

    def maps(x_u8: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(predictor.preprocess.standardise(x_u8))[:, None]
        a = torch.from_numpy(np.concatenate([session.run(None, {"image_u8": x[i:i + 8]})[0]
                                             for i in range(0, len(x), 8)]))
        alpha = w * ((a > 0) & (a < 6)).float().mean((2, 3), keepdim=True) / (a.shape[2] * a.shape[3])
        cam = F.relu((alpha * a).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=x_u8.shape[1:], mode="bilinear", align_corners=False)
        return _unit_max(cam)[:, 0].numpy().astype(np.float32)

    return maps


def _activation_session(predictor):
    """ONNX Runtime session of the uint8 input -> the ``backbone._bn1`` activations, exported once per checkpoint."""
    cache = getattr(predictor, "_cam_session", None)
    if cache is not None:
        return cache or None
    from importlib.util import find_spec

    session = False
    checksum = str(predictor.info.get("checksum", "")).removeprefix("sha256:")[:32]
    if find_spec("onnxruntime") is not None and checksum:
        import onnxruntime as ort

        from pneumoscope.inference.onnx import export_model
        from pneumoscope.inference.runtime import onnx_cache_dir, quiet_exporter

        class UpToBn1(nn.Module):
            def __init__(self, backbone) -> None:
                super().__init__()
                self.b = backbone

            def forward(self, x):
                return self.b._bn1(self.b._conv_head(forward_until(self.b, x, len(self.b._blocks))))

        path = onnx_cache_dir() / f"{checksum}-bn1-{__version__}.onnx"
        try:
            if not path.is_file():
                with quiet_exporter():
                    export_model(UpToBn1(predictor.model.backbone).eval(), predictor.preprocess, path)
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            opts.intra_op_num_threads = getattr(predictor, "threads", 0)  # serve --threads: the worker's share
            opts.inter_op_num_threads = 1
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except (RuntimeError, ValueError, TypeError, OSError) as e:
            log.warning("Grad-CAM stays on PyTorch (%s: %s)", type(e).__name__, str(e)[:200])
    object.__setattr__(predictor, "_cam_session", session)
    return session or None


def heatmap(predictor, image_u8: np.ndarray, class_idx: int | None = None) -> np.ndarray:
    """Grad-CAM map (S, S) float32 in [0, 1] of one image (resized to the model input size when needed)."""
    u8, _ = predictor.prepare(image_u8)
    return heatmaps(predictor, u8[None], class_idx)[0]


def heatmap_for_file(predictor, path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(the image at its original resolution as uint8 HxW, its Grad-CAM map (S, S) at the model input size).

    The map is computed on exactly what ``predict`` feeds the model (``predictor.prepare(path)``).
    """

    model_input, _ = predictor.prepare(path)
    original, _ = read_image(path)
    return to_uint8(original), heatmaps(predictor, model_input[None])[0]


def overlay_png(image_u8: np.ndarray, heat: np.ndarray, alpha: float = 0.4, cmap: str = "jet") -> bytes:
    """PNG bytes (RGB, the image's size) of the grey X-ray blended with the colour-mapped heatmap.

    ``heat`` is resized (bilinear) to the image size: the model's square input stretches the original, and
    stretching the map back undoes that.
    """

    img = np.asarray(image_u8)
    if img.ndim != 2 or img.dtype != np.uint8:
        raise ValueError(f"overlay_png needs a uint8 grey image HxW, got {img.dtype} {img.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must be in [0, 1]")
    h, w = img.shape
    hm = np.clip(np.asarray(heat, dtype=np.float32), 0.0, 1.0)
    if hm.shape != (h, w):
        hm = np.asarray(Image.fromarray(hm, mode="F").resize((w, h), Image.Resampling.BILINEAR))
    colour = colormaps[cmap](np.clip(hm, 0.0, 1.0))[..., :3]
    grey = np.repeat(img[..., None].astype(np.float32) / 255.0, 3, axis=2)
    rgb = np.clip(np.rint(((1.0 - alpha) * grey + alpha * colour) * 255.0), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def caption_lines(r: dict) -> list[str]:
    """What an overlay must say about itself: the label, the probability it comes from, what the colours mean."""
    return [f"{r.label}: probability {r.score:.2f} (threshold {r.threshold:.2f})",
            "Grad-CAM: where the model found evidence for pneumonia", "decision support, not for primary diagnosis"]


def with_caption(png: bytes, lines: list[str], cmap: str = "jet") -> bytes:
    """The overlay ``png`` with a band below it: ``lines`` of text and the colour legend (none -> strongest)."""
    from PIL import ImageDraw, ImageFont

    top = Image.open(io.BytesIO(png)).convert("RGB")
    w = top.width
    size = max(10, min(18, w // 28))
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    line_h, pad = size + 4, 6
    bar_h = max(8, size // 2)
    band = Image.new("RGB", (w, pad + len(lines) * line_h + bar_h + line_h + pad), "black")
    draw = ImageDraw.Draw(band)
    for i, text in enumerate(lines):
        draw.text((pad, pad + i * line_h), text, fill="white", font=font)
    y = pad + len(lines) * line_h
    ramp = (colormaps[cmap](np.linspace(0, 1, max(2, w - 2 * pad)))[:, :3] * 255).astype(np.uint8)
    band.paste(Image.fromarray(np.repeat(ramp[None], bar_h, axis=0), mode="RGB"), (pad, y))
    draw.text((pad, y + bar_h + 1), "none", fill="white", font=font)
    right = "strongest evidence"
    draw.text((w - pad - int(draw.textlength(right, font=font)), y + bar_h + 1), right, fill="white", font=font)
    out = Image.new("RGB", (w, top.height + band.height))
    out.paste(top, (0, 0))
    out.paste(band, (0, top.height))
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()


def explain(checkpoint: str | Path | None, paths: list[str | Path], out_dir: str | Path,
            device: str = "auto", errors: list[dict] | None = None) -> list[Path]:
    """Write ``<stem>_gradcam.png`` into ``out_dir`` for every image/DICOM file (folders are expanded).

    ``checkpoint=None`` explains the bundled default model. Unreadable files (corrupt, missing, unreadable, a link
    loop) are logged and skipped; ``errors``, when given, receives ``{"path", "error"}`` for each of them. Images
    the model cannot assess (inference/assess.py) and films labelled NORMAL (``HEATMAP_RULE``) get no overlay, with
    the reason logged; every overlay carries its label, probability and colour legend (``with_caption``); every warning of
    ``predict`` is logged. Two inputs with the same stem get ``<stem>_gradcam.png`` and ``<stem>_2_gradcam.png``.
    """

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PneumoscopeError(f"--out {out} is an existing file, not a folder; pass a folder for the overlays")
    predictor = load(checkpoint, device=device)
    out.mkdir(parents=True, exist_ok=True)
    files = expand_paths(list(paths), broken_links=True)
    written: list[Path] = []
    for p, r in zip(files, predictor.predict(files)):  # the warnings and "not assessed" of predict (assess.py)
        if r.error is not None:
            log.warning("cannot explain %s: %s", p, r.error)
            if errors is not None:
                errors.append({"path": str(p), "error": r.error})
            continue
        for w in r.warnings:
            log.warning("%s: %s", p, w)
        if r.label == NOT_ASSESSED:
            log.warning("%s: not assessed, no heatmap written: %s", p, r.not_assessed_reason)
            continue
        if not heatmap_shown(r.label):
            log.info("%s: labelled %s, no heatmap written (%s)", p, r.label, HEATMAP_RULE)
            continue
        try:
            image, heat = heatmap_for_file(predictor, p)
        except (ImageReadError, OSError) as e:
            msg = os_error_message(p, e) if isinstance(e, OSError) else str(e)
            log.warning("cannot explain %s", msg)
            if errors is not None:
                errors.append({"path": str(p), "error": msg})
            continue
        dest, n = out / f"{p.stem}_gradcam.png", 1
        while dest in written:
            n += 1
            dest = out / f"{p.stem}_{n}_gradcam.png"
        dest.write_bytes(with_caption(overlay_png(image, heat), caption_lines(r)))
        written.append(dest)
    log.info("wrote %d Grad-CAM overlay(s) to %s", len(written), out)
    return written
