"""Start-up of the two entry points a user waits for (issue 27, item 4), each in a fresh process, N times:
one-image ``pneumoscope predict`` from the shell (wall time to exit), and ``pneumoscope serve`` readiness (process
start to the first 200 from GET /health; the app loads and warms up the model before it serves). Prints a table.

    python benchmarks/startup.py [--checkpoint CKPT] [--image FILE] [--runs 3]
"""
from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CLI = [sys.executable, "-m", "pneumoscope"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def predict_once(image: str, ckpt: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([*CLI, "predict", image, *ckpt], check=True, capture_output=True)
    return time.perf_counter() - t0


def serve_ready(ckpt: list[str], timeout: float = 120.0) -> float:
    port, tmp = free_port(), tempfile.mkdtemp()
    t0 = time.perf_counter()
    p = subprocess.Popen([*CLI, "serve", "--host", "127.0.0.1", "--port", str(port), "--db", f"{tmp}/s.db", *ckpt],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - t0 < timeout:
            if p.poll() is not None:
                raise RuntimeError(f"serve exited with code {p.returncode} before it was ready")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        return time.perf_counter() - t0
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"serve not ready after {timeout:.0f} s")
    finally:
        p.terminate()
        p.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--checkpoint", help="default: the bundled default model")
    a.add_argument("--image", help="default: the first NORMAL film of ../shared/data/chest_xray/train")
    a.add_argument("--runs", type=int, default=3)
    args = a.parse_args()
    image = args.image or str(sorted((Path("../shared/data/chest_xray/train/NORMAL")).glob("*.jpeg"))[0])
    ckpt = ["--checkpoint", args.checkpoint] if args.checkpoint else []
    predict_once(image, ckpt)  # the first run may export the model to the ONNX cache: not start-up
    rows = {"one-image `pneumoscope predict` (wall, to exit)": [predict_once(image, ckpt) for _ in range(args.runs)],
            "`pneumoscope serve` ready (start to first /health 200)": [serve_ready(ckpt) for _ in range(args.runs)]}
    print("| entry point | median | runs |\n| --- | ---: | --- |")
    for name, t in rows.items():
        print(f"| {name} | {statistics.median(t):.2f} s | {', '.join(f'{x:.2f}' for x in t)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
