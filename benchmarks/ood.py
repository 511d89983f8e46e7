"""Out-of-distribution figures of the bundled default model (or --checkpoint): the flagged share of the patient-level
validation split, of every folder under ../shared/data/external, of the shared DICOM files and of generated
corruptions (blank, inverted, heavy crop, noise); the batch shift test's p-value for 50-image batches; and the
time the OOD check adds per image. Prints a markdown table (and --json).

    python benchmarks/ood.py [--checkpoint CKPT] [--data ../shared/data] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from pneumoscope.config import resolve
from pneumoscope.data.cache import decode_all
from pneumoscope.data.folders import expand_paths
from pneumoscope.data.splits import split_samples
from pneumoscope.inference.loader import load
from pneumoscope.models.checkpoint import load_checkpoint
from pneumoscope.trust.data_compare import shift_test
from pneumoscope.trust.shift import apply


def flagged(pred, images: np.ndarray) -> float:
    return float((pred.ood_scores(images) > 1).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(2)
    pred = load(a.checkpoint, device="cpu")
    size, root = pred.preprocess.input_size, Path(a.data)
    ck = load_checkpoint(pred.info["checkpoint"])
    _, val, _, _ = split_samples(resolve(dict(ck["config"]), data=str(root / "chest_xray"), limit=0, progress=False))
    v = decode_all([s.path for s in val], size, progress=False).images
    rows = [("validation split (held-out patients)", len(v), flagged(pred, v))]
    sets = {f"external/{d.name}": expand_paths([d]) for d in sorted((root / "external").iterdir()) if d.is_dir()}
    sets["shared DICOM files (readable ones)"] = expand_paths([root / "dicom"])
    decoded = {}
    for name, paths in sets.items():
        d = decode_all(paths, size, progress=False)
        decoded[name] = d.images[d.ok]
        rows.append((name, int(d.ok.sum()), flagged(pred, decoded[name])))
    base = v[:200]
    for name, x in {"blank": np.zeros_like(base), "inverted": 255 - base, "heavy crop (40 %)": apply("crop", base, 0.4),
                    "noise (std 0.2)": apply("noise", base, 0.2)}.items():
        rows.append((f"generated: {name}", len(x), flagged(pred, x)))
    rng = np.random.default_rng(0)
    p_vals = {"validation vs validation (another 50)": shift_test(v[rng.choice(len(v), 50, replace=False)],
                                                                   v[rng.choice(len(v), 50, replace=False)])["p_value"]}
    for name in [k for k in decoded if k.startswith("external/")]:
        x = decoded[name]
        p_vals[f"validation vs {name}"] = shift_test(v[:50], x[rng.choice(len(x), min(50, len(x)), replace=False)])["p_value"]
    pred.ood_scores(v[:16])
    t0 = time.perf_counter()
    for i in range(0, 128, 16):
        pred.ood_scores(v[i:i + 16])
    ms = (time.perf_counter() - t0) / 128 * 1000
    print("| set | images | flagged out of distribution |\n| --- | ---: | ---: |")
    for name, n, f in rows:
        print(f"| {name} | {n} | {100 * f:.1f} % |")
    print("\n| 50-image batch test (MMD, permutation) | p-value |\n| --- | ---: |")
    for k, p in p_vals.items():
        print(f"| {k} | {p:.4f} |")
    print(f"\nOOD check: {ms:.2f} ms per image (batches of 16, 2 threads, {size} px input)")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "p_values": p_vals, "ms_per_image": ms}, indent=2))


if __name__ == "__main__":
    main()
