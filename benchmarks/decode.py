"""Decoding speed: JPEG on disk -> uint8 SxS grey, the first step of training and of every prediction.

Per size: p50 of one ``load_uint8`` call, ``decode_all`` images/s with 1 and with all worker threads, and the
images/s of reading back the on-disk ``.npz`` cache (``cache_dir``).

    python benchmarks/decode.py                 # 512 shared images at 150 and 224 px
    python benchmarks/decode.py --n 5216        # the whole shared training split
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from pneumoscope.data.cache import decode_all
from pneumoscope.data.intake import load_uint8
from pneumoscope.studies.bench import describe, device_description

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--n", type=int, default=512, help="images (default 512)")
    ap.add_argument("--sizes", default="150,224")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    paths = sorted(args.data.rglob("*.jpeg"))[: args.n]
    cores = os.cpu_count() or 1
    print(f"# decode\n\nDevice: {describe(device_description())}; {len(paths)} JPEGs from {args.data}\n")
    print(f"| px | load_uint8 p50 ms | decode_all 1 worker img/s | decode_all {cores} workers img/s | npz cache read img/s |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        one = []
        for p in paths[:200]:
            t0 = time.perf_counter()
            load_uint8(p, size)
            one.append(time.perf_counter() - t0)
        rate = {}
        for workers in sorted({1, cores}):
            t0 = time.perf_counter()
            decode_all(paths, size, workers=workers, progress=False)
            rate[workers] = len(paths) / (time.perf_counter() - t0)
        with tempfile.TemporaryDirectory() as tmp:
            decode_all(paths, size, workers=cores, cache_dir=tmp, progress=False)
            t0 = time.perf_counter()
            d = decode_all(paths, size, cache_dir=tmp, progress=False)
            cached = len(paths) / (time.perf_counter() - t0)
        assert d.images.shape == (len(paths), size, size)
        r = {"size": size, "load_uint8_p50_ms": 1e3 * float(np.median(one)), "decode_1_worker": rate[1],
             "decode_all_workers": rate[cores], "cache_read": cached}
        rows.append(r)
        print(f"| {size} | {r['load_uint8_p50_ms']:.2f} | {rate[1]:.0f} | {rate[cores]:.0f} | {cached:.0f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": device_description(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
