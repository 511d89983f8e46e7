"""Training throughput (images/s, steady state) and achieved GFLOP/s vs the measured matrix-product peak.

The step is training/loop.py's: uint8 batch -> float -> batched augmentation -> normalise -> forward -> loss -> backward ->
AdamW step, on real shared images decoded once. Variants: fp32 NCHW with PyTorch's pooling and glibc's malloc
defaults (naive PyTorch), fp32 channels_last, bf16 autocast + channels_last (= training/loop.py here), and the latter with
either of its memory-side optimisations off (numba pooling, glibc keeping freed memory). FLOPs: the forward pass
is counted with torch.utils.flop_counter.FlopCounterMode (convolutions and matrix products; element-wise ops are not
counted) and forward + backward is taken as 3 x forward: the counter's
own backward count is wrong for grouped (depthwise) convolutions (torch 2.13 counts EfficientNet-Lite0's
convolution_backward as 31 GFLOP per image, ~40 x too much). The peaks are n x n matrix products in the same process.

Rates are given per wall-clock second and per CPU-second of the process (summed over threads): on a machine
shared with other work the first drops with the CPU share, the second barely moves, so the fraction of peak is
computed from CPU-seconds on both sides.

    python benchmarks/train_throughput.py                   # seed_cnn 150, seed_cnn 224, efficientnet_lite0 224
    python benchmarks/train_throughput.py --profile         # top operators of one configuration, then exit
    python benchmarks/train_throughput.py --configs seed_cnn:150 --steps 30 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pneumoscope.config import TrainConfig
from pneumoscope.inference.runtime import normalize
from pneumoscope.models.pooling import set_fast_pooling
from pneumoscope.models.registry import create_model
from pneumoscope.studies.bench import describe, device_description, matmul_gflops
from pneumoscope.training.augment import augment_batch
from pneumoscope.training.setup import reuse_freed_memory

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray"

# name: (autocast dtype, channels_last, numba pooling, glibc keeps freed memory). "bf16+cl" is what training/loop.py does
# on this CPU; the last two switch one of its two memory-side optimisations off, in the same process.
VARIANTS = {"fp32": (None, False, False, False), "fp32+cl": (None, True, True, True),
            "bf16+cl": (torch.bfloat16, True, True, True),
            "bf16+cl, PyTorch pooling": (torch.bfloat16, True, False, True),
            "bf16+cl, glibc malloc defaults": (torch.bfloat16, True, True, False)}


def real_images(data: Path, n: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n real training images (seeded random subset), decoded to uint8 (n, 1, size, size), and their labels."""
    from pneumoscope.data.cache import decode_all
    from pneumoscope.data.folders import scan

    samples = scan(data).samples
    pick = np.random.default_rng(seed).choice(len(samples), size=min(n, len(samples)), replace=False)
    chosen = [samples[i] for i in sorted(pick)]
    d = decode_all([s.path for s in chosen], size, progress=False)
    return torch.from_numpy(d.images).unsqueeze(1), torch.tensor([s.label for s in chosen])


class Step:
    """One training step of training/loop.py, for one (model, variant)."""

    def __init__(self, name: str, size: int, variant: str, x: torch.Tensor, y: torch.Tensor, batch: int) -> None:
        torch.manual_seed(0)
        self.amp, self.cl, self.fast_pool, self.keep_memory = VARIANTS[variant]
        self.model = create_model(name, num_classes=1, image_size=size)
        if self.cl:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.pre = self.model.preprocess
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.cfg = TrainConfig(data="-")
        self.g = torch.Generator().manual_seed(0)
        self.x, self.y, self.batch = x, y, batch

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(self.y), (self.batch,), generator=self.g)
        xb = augment_batch(self.x[idx].float().div_(255), self.g, self.cfg)
        xb = normalize(xb, self.pre) if self.cl else (xb - self.pre.mean[0]) / self.pre.std[0]
        return xb, self.y[idx].float()

    def forward_backward(self, xb: torch.Tensor, yb: torch.Tensor) -> None:
        with torch.autocast("cpu", dtype=self.amp or torch.float32, enabled=self.amp is not None):
            logits = self.model(xb)
        loss = F.binary_cross_entropy_with_logits(logits[:, 0].float(), yb)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()

    def __call__(self) -> None:
        set_fast_pooling(self.fast_pool)
        reuse_freed_memory(self.keep_memory)
        self.model.train()
        self.forward_backward(*self.inputs())
        self.opt.step()

    def flops_per_image(self) -> float:
        """3 x the counted forward FLOPs (backward = 2 x forward: gradients of inputs and of weights)."""
        from torch.utils.flop_counter import FlopCounterMode

        xb, _ = self.inputs()
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            self.model(xb)
        return 3 * fc.get_total_flops() / self.batch


def images_per_s(step: Step, warmup: int, steps: int) -> tuple[float, float]:
    """(images per wall-clock second, images per CPU-second of this process), after ``warmup`` steps."""
    for _ in range(warmup):
        step()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    n = steps * step.batch
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def profile(step: Step, steps: int = 5, rows: int = 15) -> str:
    """Top operators by self CPU time over ``steps`` training steps (after 2 warm-up steps)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    for _ in range(2):
        step()
    with prof(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(steps):
            step()
    return p.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--configs", default="seed_cnn:150,seed_cnn:224,efficientnet_lite0:224", help="model:size,...")
    ap.add_argument("--variants", default=";".join(VARIANTS), help=f"';'-separated subset of {'; '.join(VARIANTS)}")
    ap.add_argument("--n", type=int, default=256, help="real images decoded per size (default 256)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per configuration (default 10)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    ap.add_argument("--profile", action="store_true", help="print the top operators of each configuration and exit")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    configs = [(c.split(":")[0], int(c.split(":")[1])) for c in args.configs.split(",")]
    variants = [v.strip() for v in args.variants.split(";")]
    data: dict[int, tuple] = {}

    print(f"# training throughput\n\nDevice: {describe(device_description())}; {torch.get_num_threads()} threads\n")
    if args.profile:
        for name, size in configs:
            data.setdefault(size, real_images(args.data, args.n, size))
            for v in variants:
                table = profile(Step(name, size, v, *data[size], args.batch_size))
                print(f"## {name} {size} px, {v}, batch {args.batch_size}\n\n```\n{table}```\n")
        return 0

    peak = {d: matmul_gflops(d, 1024, 2.0) for d in ("fp32", "bf16")}
    cpu_peak = {d: matmul_gflops(d, 1024, 2.0, per_cpu_second=True) for d in ("fp32", "bf16")}
    print(f"Matrix-product peak (1024 x 1024, measured): fp32 {peak['fp32']:.0f} GFLOP/s "
          f"({cpu_peak['fp32']:.0f} per CPU-s), bf16 {peak['bf16']:.0f} GFLOP/s ({cpu_peak['bf16']:.0f} per CPU-s)\n")
    print("| model | px | variant | train images/s | images per CPU-s | GFLOP per image (fwd+bwd) | "
          "GFLOP per CPU-s | % of matmul peak |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    results = []
    for name, size in configs:
        data.setdefault(size, real_images(args.data, args.n, size))
        for v in variants:
            step = Step(name, size, v, *data[size], args.batch_size)
            flops = step.flops_per_image()
            ips, ips_cpu = images_per_s(step, args.warmup, args.steps)
            achieved = flops * ips_cpu / 1e9
            frac = achieved / cpu_peak["bf16" if VARIANTS[v][0] is not None else "fp32"]
            results.append({"model": name, "size": size, "variant": v, "images_per_s": ips,
                            "images_per_cpu_s": ips_cpu, "gflop_per_image": flops / 1e9,
                            "gflop_per_cpu_s": achieved, "fraction_of_peak": frac})
            print(f"| {name} | {size} | {v} | {ips:.1f} | {ips_cpu:.1f} | {flops / 1e9:.2f} | {achieved:.0f} | "
                  f"{100 * frac:.0f} % |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": device_description(), "threads": torch.get_num_threads(),
                                         "peak_gflops": peak, "peak_gflop_per_cpu_s": cpu_peak,
                                         "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
