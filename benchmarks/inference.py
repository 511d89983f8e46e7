"""Inference speed: single-image latency (JPEG on disk -> decode -> resize -> logits) and batch throughput,
PyTorch eager (pneumoscope.inference.predictor.Predictor, fp32 and bf16) vs ONNX Runtime
(pneumoscope.inference.onnx.OnnxBackend, fp32
and int8 from pneumoscope.inference.onnx.quantize_onnx calibrated on 64 shared training images).

Models: seed_cnn at 150 px (random init) and efficientnet_lite0 at 224 px (the packaged ImageNet weights folded to
one channel, so activations look like a real model's; speed does not depend on the weights otherwise).
Targets on the 2-core development CPU: seed_cnn p50 <= 5 ms, efficientnet_lite0 p50 <= 15 ms, seed_cnn batch
throughput >= 500 images/s.

    python benchmarks/inference.py                    # both models, 1 thread and all threads
    python benchmarks/inference.py --models seed_cnn:150 --iters 200 --json out.json
    python benchmarks/inference.py --pipeline FOLDER          # predict end to end vs a bare decode + ONNX loop
    python benchmarks/inference.py --checkpoint model.pt --threads 2   # a trained model (an ensemble: all members)
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pneumoscope.config import parse_tta
from pneumoscope.data.intake import load_uint8
from pneumoscope.inference.onnx import (
    OnnxBackend,
    calibration_images,
    export_model,
    quantize_onnx,
)
from pneumoscope.inference.predictor import Predictor
from pneumoscope.inference.tta import with_views
from pneumoscope.models.checkpoint import load_checkpoint, model_from_checkpoint
from pneumoscope.models.registry import create_model
from pneumoscope.studies.bench import describe, device_description

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray"
TARGET_P50_MS = {"seed_cnn": 5.0, "efficientnet_lite0": 15.0}
TARGET_BATCH = {"seed_cnn": 500.0}


def build(name: str, size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, num_classes=1, image_size=size, pretrained=name == "efficientnet_lite0").eval()


def torch_logits(model: torch.nn.Module, amp: torch.dtype | None = None):
    p = Predictor(model=model.to(memory_format=torch.channels_last), preprocess=model.preprocess,
                  label_names=("NORMAL", "PNEUMONIA"), threshold=0.5, temperature=None, amp=amp)
    return p.logits


def latency_ms(logits, paths: list[Path], size: int, iters: int, warmup: int) -> dict:
    """p50/p99 of decode + resize + logits of one image (cycling over ``paths``), and of decode + resize alone."""
    total, dec = [], []
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        u8 = load_uint8(paths[i % len(paths)], size)
        t1 = time.perf_counter()
        logits(np.stack([u8]))  # as Predictor.predict batches prepared images
        t2 = time.perf_counter()
        if i >= warmup:
            total.append(t2 - t0)
            dec.append(t1 - t0)
    total_ms, dec_ms = 1e3 * np.array(total), 1e3 * np.array(dec)
    return {"p50_ms": float(np.percentile(total_ms, 50)), "p99_ms": float(np.percentile(total_ms, 99)),
            "decode_p50_ms": float(np.percentile(dec_ms, 50))}


def throughput(logits, batch_u8: np.ndarray, seconds: float) -> tuple[float, float]:
    """Images/s of logits() on a ready uint8 batch (decode excluded), after one warm-up call: per wall-clock
    second, and per CPU-second of this process (all its threads), which background load does not change much."""
    logits(batch_u8)
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        logits(batch_u8)
        n += len(batch_u8)
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def pipeline_vs_bare(folder: Path, n: int) -> dict:
    """Issue 27's comparison, in one run on the same files: ``pneumoscope predict FOLDER`` end to end (a new
    process: start-up, model load, decode, quality, OOD, model, CSV) and in-process ``Predictor.predict``, against a
    bare loop of Pillow decode + resize (``load_uint8``) + ONNX Runtime logits of the exported bundled model."""
    import subprocess
    import sys

    from pneumoscope.inference.loader import load

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png", ".dcm"))[:n]
    with tempfile.TemporaryDirectory() as tmp:
        links = Path(tmp) / "films"
        links.mkdir()
        for i, f in enumerate(files):
            (links / f"{i:05d}_{f.name}").symlink_to(f.resolve())
        pred = load(None, device="cpu")  # ONNX Runtime copy made (and cached) before anything is timed
        pred.predict(files[:8])
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pneumoscope", "predict", str(links), "-o", str(Path(tmp) / "p.csv")],
                       check=True, capture_output=True)
        cli = time.perf_counter() - t0
    t0 = time.perf_counter()
    pred.predict(files)
    inproc = time.perf_counter() - t0
    backend = pred.backend
    t0 = time.perf_counter()
    for f in files:
        backend.logits(load_uint8(f, pred.preprocess.input_size)[None])
    bare = time.perf_counter() - t0
    return {"files": len(files), "cli_s": cli, "in_process_s": inproc, "bare_s": bare,
            "cli_vs_bare": cli / bare, "in_process_vs_bare": inproc / bare}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--models", default="seed_cnn:150,efficientnet_lite0:224", help="model:size,...")
    ap.add_argument("--threads", default=f"1,{os.cpu_count() or 1}", help="thread counts to try (default 1,all)")
    ap.add_argument("--iters", type=int, default=300, help="timed single-image predictions (default 300)")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=3.0, help="duration of each throughput measurement")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--pipeline", type=Path, metavar="DIR",
                    help="only issue 27's comparison: predict on the films of DIR end to end vs a bare decode + ONNX "
                         "Runtime loop, same run (e.g. a 624-film folder)")
    ap.add_argument("--n", type=int, default=624, help="films of --pipeline DIR (default 624)")
    ap.add_argument("--checkpoint", type=Path, help="time this trained model (all members of an ensemble together) "
                                                     "instead of --models; PyTorch fp32 and ONNX Runtime only")
    args = ap.parse_args(argv)
    if args.pipeline:
        r = pipeline_vs_bare(args.pipeline, args.n)
        print(f"Device: {describe(device_description())}\n\n| path | {r['files']} films | images/s | vs bare |\n"
              f"| --- | ---: | ---: | ---: |\n"
              f"| `pneumoscope predict DIR` (new process) | {r['cli_s']:.1f} s | {r['files'] / r['cli_s']:.0f} | "
              f"{r['cli_vs_bare']:.2f}x |\n"
              f"| `Predictor.predict(files)` (in process) | {r['in_process_s']:.1f} s | "
              f"{r['files'] / r['in_process_s']:.0f} | {r['in_process_vs_bare']:.2f}x |\n"
              f"| bare loop: Pillow decode + resize + ONNX Runtime | {r['bare_s']:.1f} s | "
              f"{r['files'] / r['bare_s']:.0f} | 1.00x |")
        if args.json:
            args.json.write_text(json.dumps({"device": device_description(), **r}, indent=2))
        return 0
    paths = sorted((args.data / "train" / "NORMAL").glob("*.jpeg"))[:100] + \
        sorted((args.data / "train" / "PNEUMONIA").glob("*.jpeg"))[:100]
    thread_counts = sorted({int(t) for t in args.threads.split(",")})

    print(f"# inference\n\nDevice: {describe(device_description())}\n")
    print("| model | px | backend | threads | p50 ms | p99 ms | decode p50 ms | batch images/s | images per CPU-s |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in [f"checkpoint:{args.checkpoint}"] if args.checkpoint else args.models.split(","):
            views = ()
            if args.checkpoint:
                ck = load_checkpoint(args.checkpoint)
                model = model_from_checkpoint(ck).eval()
                name, size = f"{args.checkpoint.name} ({model.arch['name']})", model.preprocess.input_size
                views = parse_tta((ck.get("config") or {}).get("tta", ""))  # its test-time views count too
                model = with_views(model, views).eval()
                name += f" + views {'+'.join(views)}" if views else ""
            else:
                name, size = spec.split(":")[0], int(spec.split(":")[1])
                model = build(name, size)
            onnx_path = export_model(model, model.preprocess, Path(tmp) / "model.onnx")
            int8_path = None if args.checkpoint else quantize_onnx(
                onnx_path, Path(tmp) / f"{name}.int8.onnx", calibration_images(args.data / "train", size))
            batch = np.stack([load_uint8(p, size) for p in paths[: args.batch_size]])
            for threads in thread_counts:
                torch.set_num_threads(threads)
                backends = {"pytorch fp32": torch_logits(model),
                            "onnxruntime": OnnxBackend(onnx_path, threads=threads).logits}
                if int8_path is not None:
                    backends.update({"pytorch bf16": torch_logits(model, torch.bfloat16),
                                     "onnxruntime int8": OnnxBackend(int8_path, threads=threads).logits})
                for bname, fn in backends.items():
                    wall, cpu = throughput(fn, batch, args.seconds)
                    r = {"model": name, "size": size, "backend": bname, "threads": threads,
                         **latency_ms(fn, paths, size, args.iters, args.warmup),
                         "batch_images_per_s": wall, "images_per_cpu_s": cpu}
                    rows.append(r)
                    print(f"| {name} | {size} | {bname} | {threads} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                          f"{r['decode_p50_ms']:.2f} | {wall:.0f} | {cpu:.0f} |", flush=True)
    print()
    for name, target in TARGET_P50_MS.items():
        best = min((r for r in rows if r["model"] == name), key=lambda r: r["p50_ms"], default=None)
        if best:
            print(f"- {name}: best p50 {best['p50_ms']:.2f} ms ({best['backend']}, {best['threads']} threads); "
                  f"target <= {target} ms: {'met' if best['p50_ms'] <= target else 'MISSED'}")
    for name, target in TARGET_BATCH.items():
        best = max((r for r in rows if r["model"] == name), key=lambda r: r["batch_images_per_s"], default=None)
        if best:
            print(f"- {name}: best batch throughput {best['batch_images_per_s']:.0f} images/s ({best['backend']}, "
                  f"{best['threads']} threads); target >= {target:.0f}: "
                  f"{'met' if best['batch_images_per_s'] >= target else 'MISSED'}")
    if args.json:
        args.json.write_text(json.dumps({"device": device_description(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
