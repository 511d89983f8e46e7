"""``pneumoscope bench``: one training epoch per hardware configuration, through ``train()``, as a markdown table.

Configurations: 1 thread vs all threads, fp32 vs bf16 autocast, on the CPU, and on CUDA when one is visible.
Also the helpers the scripts in benchmarks/ share: ``device_description()`` and ``matmul_gflops()``.
"""
from __future__ import annotations

import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from pneumoscope.inference.runtime import cpu_has_bf16
from pneumoscope.training.loop import train

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- the machine
def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def memory_gib() -> float | None:
    """Total RAM in GiB from /proc/meminfo (Linux); None elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    return None


def device_description() -> dict:
    """CPU model, logical cores, memory, bf16 support, GPU name (if any), torch version."""

    mem = memory_gib()
    d = {"cpu": cpu_model(), "cores": os.cpu_count() or 1, "memory_gib": round(mem, 1) if mem else None,
         "cpu_bf16": cpu_has_bf16(), "gpu": None, "torch": torch.__version__}
    if torch.cuda.is_available():
        d["gpu"] = torch.cuda.get_device_name(0)
    return d


def describe(d: dict) -> str:
    """One line, e.g. 'AMD EPYC, 2 cores, 23.5 GiB RAM, AVX512-BF16/AMX: yes, GPU: none, torch 2.13.0+cpu'."""
    mem = f"{d['memory_gib']} GiB RAM" if d.get("memory_gib") else "RAM unknown"
    return (f"{d['cpu']}, {d['cores']} cores, {mem}, AVX512-BF16/AMX: {'yes' if d['cpu_bf16'] else 'no'}, "
            f"GPU: {d['gpu'] or 'none'}, torch {d['torch']}")


def matmul_gflops(dtype: str = "fp32", n: int = 1024, seconds: float = 1.0, device: str = "cpu",
                  per_cpu_second: bool = False) -> float:
    """Measured GFLOP/s of an n x n matrix product (2 n^3 FLOPs) in fp32 or bf16: the practical peak.

    ``per_cpu_second``: GFLOP per CPU-second of this process (summed over its threads) instead of per wall-clock
    second; on a machine shared with other work this stays near the idle figure divided by the thread count.
    """

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a = torch.randn(n, n, device=device).to(dt)
    b = torch.randn(n, n, device=device).to(dt)
    c = torch.empty(n, n, device=device, dtype=dt)
    for _ in range(3):
        torch.mm(a, b, out=c)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    clock = time.process_time if per_cpu_second else time.perf_counter
    iters, t0, c0 = 0, time.perf_counter(), clock()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b, out=c)
        iters += 1
        sync()
    return 2 * n**3 * iters / (clock() - c0) / 1e9


# ------------------------------------------------------------------------------------------- the bench
def configurations(cuda: bool | None = None) -> list[dict]:
    """(device, threads, precision) to time: CPU 1 thread / all threads x fp32 / bf16, then CUDA if present."""

    cores = os.cpu_count() or 1
    out = [{"device": "cpu", "threads": t, "precision": p} for t in sorted({1, cores}) for p in ("fp32", "bf16")]
    if torch.cuda.is_available() if cuda is None else cuda:
        out += [{"device": "cuda", "threads": cores, "precision": p} for p in ("fp32", "bf16")]
    return out


def bench(data: str | Path, model: str = "seed_cnn", image_size: int | None = 150, limit: int = 1024,
          batch_size: int = 32, out: str | Path | None = None) -> dict:
    """Train one epoch per configuration; return {"device": ..., "rows": [...], "markdown": str}.

    Rows: configuration, seconds per epoch (training + validation), training images/s, speed-up vs the slowest.
    Images are decoded once (shared on-disk cache in a temporary folder). ``out``: write the markdown there.
    """

    threads_before = torch.get_num_threads()
    dev = device_description()
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="pneumoscope-bench-") as tmp:
            for i, c in enumerate(configurations()):
                m = train(dict(data=str(data), model=model, image_size=image_size, limit=limit, epochs=1,
                               batch_size=batch_size, threads=c["threads"], precision=c["precision"],
                               device=c["device"], progress=False, cache_dir=str(Path(tmp) / "cache"),
                               out=str(Path(tmp) / f"run{i}")))
                h = m["history"][0]
                rows.append({**c, "name": f"{c['device']} {c['threads']} thread{'s' if c['threads'] > 1 else ''} "
                                          f"{c['precision']}", "seconds_per_epoch": h["seconds"],
                             "images_per_s": h["images_per_s"], "n_train": m["n_train"], "image_size": m["image_size"]})
    finally:
        torch.set_num_threads(threads_before)
    slowest = min(r["images_per_s"] for r in rows)
    for r in rows:
        r["speedup"] = r["images_per_s"] / slowest
    md = to_markdown(dev, rows, model)
    if out:
        Path(out).write_text(md)
    return {"device": dev, "rows": rows, "markdown": md}


def to_markdown(dev: dict, rows: list[dict], model: str) -> str:
    n, size = (rows[0]["n_train"], rows[0]["image_size"]) if rows else (0, 0)
    lines = [f"# pneumoscope bench: {model} at {size} px, one epoch of {n} training images", "",
             f"Device: {describe(dev)}", "",
             "| configuration | device | threads | precision | s/epoch | train images/s | speed-up vs slowest |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['device']} | {r['threads']} | {r['precision']} | {r['seconds_per_epoch']:.2f} "
                     f"| {r['images_per_s']:.1f} | {r['speedup']:.2f}x |")
    lines += ["", ("s/epoch includes the validation pass; images/s counts training steps only (augmentation, "
                   "forward, backward, optimizer)."), ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ CLI
