"""Load test of ``pneumoscope serve``: N concurrent clients x M requests each, with and without heatmaps.

Starts ``python -m pneumoscope serve --checkpoint CKPT`` on 127.0.0.1 (a free port, a fresh database in a
temporary folder), uploads real chest X-ray JPEGs one per request, and prints per phase the throughput, p50/p99
latency and errors; then checks that the database holds exactly one prediction row per successful request.

    python benchmarks/service_load.py --checkpoint runs/seed_cnn/best.pt --clients 20 --requests 10
    python benchmarks/service_load.py --checkpoint best.pt --heatmap false --target-p99-ms 250

Exit status 1 when a request failed, the database disagrees, or p99 misses --target-p99-ms.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = Path(os.environ.get("PNEUMOSCOPE_SHARED_DATA", REPO.parent / "shared" / "data")) / "chest_xray" / "train"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path, db: Path, port: int, log_path: Path, threads: int | None) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("PNEUMOSCOPE_API_KEY", None)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "pneumoscope", "serve", "--checkpoint", str(checkpoint), "--db", str(db),
           "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, env=env, cwd=db.parent)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise SystemExit(f"server did not answer /health within 180 s:\n{log_path.read_text()[-3000:]}")


def run_phase(url: str, payloads: list[tuple[str, bytes]], clients: int, requests: int, heatmap: bool,
              max_seconds: float) -> dict:
    """``clients`` threads, each sending up to ``requests`` uploads (stopping at the deadline)."""
    latencies: list[float] = []
    stages: dict[str, list[float]] = {}
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + max_seconds
    start = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            start.wait()
            for k in range(requests):
                if time.monotonic() > deadline:
                    return
                name, data = payloads[(i * requests + k) % len(payloads)]
                t0 = time.perf_counter()
                try:
                    r = c.post(f"/predict?heatmap={str(heatmap).lower()}",
                               files=[("file", (name, data, "image/jpeg"))])
                    ok = r.status_code == 200
                    err = None if ok else f"{r.status_code}: {r.text[:200]}"
                except httpx.HTTPError as e:
                    ok, err = False, f"{type(e).__name__}: {e}"
                dt = (time.perf_counter() - t0) * 1000
                with lock:
                    if ok:
                        latencies.append(dt)
                        for part in r.headers.get("server-timing", "").split(","):
                            if ";dur=" in part:
                                n, d = part.strip().split(";dur=")
                                stages.setdefault(n, []).append(float(d))
                    else:
                        errors.append(err)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array(latencies) if latencies else np.array([float("nan")])
    return {"heatmap": heatmap, "clients": clients, "ok": len(latencies), "errors": len(errors),
            "first_errors": errors[:3], "seconds": round(wall, 2), "throughput_rps": round(len(latencies) / wall, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "max_ms": round(float(lat.max()), 1),
            "server_stages_p50_p99_ms": {n: [round(float(np.percentile(v, 50)), 1), round(float(np.percentile(v, 99)), 1)]
                                         for n, v in stages.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="best.pt the server loads")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--requests", type=int, default=10, help="requests per client per phase (default 10)")
    p.add_argument("--heatmap", choices=["both", "true", "false"], default="both")
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of JPEGs (searched recursively)")
    p.add_argument("--n-images", type=int, default=40, help="distinct images uploaded (default 40)")
    p.add_argument("--max-seconds", type=float, default=120.0, help="per phase: no new request after this")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the server")
    p.add_argument("--target-p99-ms", type=float, help="fail when the heatmap=false p99 is above this")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args(argv)

    every = sorted(args.images.rglob("*.jpeg"))
    files = every[::max(1, len(every) // args.n_images)][:args.n_images]  # spread over the classes
    payloads = [(f.name, f.read_bytes()) for f in files]
    if not payloads:
        raise SystemExit(f"no .jpeg under {args.images}")
    phases = {"both": [False, True], "true": [True], "false": [False]}[args.heatmap]
    with tempfile.TemporaryDirectory(prefix="pneumoscope-load-") as tmp:
        db = Path(tmp) / "load.db"
        port = free_port()
        proc = start_server(Path(args.checkpoint).resolve(), db, port, Path(tmp) / "server.log", args.threads)
        results = []
        try:
            url = f"http://127.0.0.1:{port}"
            run_phase(url, payloads, 2, 2, True, 30)  # warm-up (not counted)
            before = sqlite3.connect(db).execute("SELECT count(*) FROM predictions").fetchone()[0]
            for heatmap in phases:
                r = run_phase(url, payloads, args.clients, args.requests, heatmap, args.max_seconds)
                conn = sqlite3.connect(db)
                rows = conn.execute("SELECT count(*) FROM predictions").fetchone()[0]
                conn.close()
                r["db_rows_added"], r["db_ok"] = rows - before, rows - before == r["ok"]
                before = rows
                results.append(r)
        finally:
            proc.terminate()
            proc.wait(30)
    fail = False
    for r in results:
        if args.json:
            continue
        print(f"heatmap={str(r['heatmap']).lower():5s} clients={r['clients']:3d} ok={r['ok']:5d} errors={r['errors']:3d} "
              f"{r['throughput_rps']:7.1f} req/s  p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  "
              f"max {r['max_ms']:7.1f} ms  db rows +{r['db_rows_added']} ({'ok' if r['db_ok'] else 'MISMATCH'})")
        print("   server stages p50/p99 ms:", ", ".join(f"{n} {a}/{b}" for n, (a, b) in r["server_stages_p50_p99_ms"].items()))
        for e in r["first_errors"]:
            print("   error:", e)
    if args.json:
        print(json.dumps(results, indent=2))
    for r in results:
        fail |= r["errors"] > 0 or not r["db_ok"]
        if args.target_p99_ms is not None and not r["heatmap"] and r["p99_ms"] > args.target_p99_ms:
            print(f"p99 {r['p99_ms']} ms > target {args.target_p99_ms} ms", file=sys.stderr)
            fail = True
    return 1 if fail else 0


if __name__ == "__main__":
    raise SystemExit(main())
