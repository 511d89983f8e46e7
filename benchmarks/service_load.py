"""Load test of ``pneumoscope serve``: N concurrent clients x M requests each, with and without heatmaps.

Starts ``python -m pneumoscope serve --checkpoint CKPT [--workers W]`` on 127.0.0.1 (a free port, a fresh
database: a SQLite file in a temporary folder, or with ``--db postgresql`` a temporary PostgreSQL server of its own,
tests/pgtemp.py), uploads real chest X-ray JPEGs one per request, and prints per phase the
throughput, p50/p99 latency and errors. The first ``--same-image-clients`` clients upload one and the same image
at the same moments. Then it checks the database: exactly one prediction row per successful request, and per
phase exactly one study of the shared image and one per other distinct image.

    python benchmarks/service_load.py --checkpoint runs/seed_cnn/best.pt --clients 20 --requests 10
    python benchmarks/service_load.py --checkpoint best.pt --heatmap false --target-p99-ms 250
    python benchmarks/service_load.py --checkpoint best.pt --workers 2 --db postgresql --clients 40 --heatmap false

Exit status 1 when a request failed, the database disagrees, or p99 misses --target-p99-ms.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from sqlalchemy import text

from pneumoscope.studydb.schema import engine_for

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the tests' temporary PostgreSQL server (tests/pgtemp.py) is test scaffolding
from tests.pgtemp import TempPostgres  # noqa: E402

DEFAULT_IMAGES = Path(os.environ.get("PNEUMOSCOPE_SHARED_DATA", REPO.parent / "shared" / "data")) / "chest_xray" / "train"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path, db: str, port: int, log_path: Path, threads: int | None,
                 workers: int = 1) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("PNEUMOSCOPE_API_KEY", None)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "pneumoscope", "serve", "--checkpoint", str(checkpoint), "--db", str(db),
           "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--workers", str(workers),
           *(["--threads", str(threads)] if threads else [])]
    proc = subprocess.Popen(cmd, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, env=env, cwd=log_path.parent)
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


def db_counts(db: str, shared_sha: str) -> tuple[int, int, int]:
    """(prediction rows, studies, studies of the shared image)."""
    engine = engine_for(db)
    try:
        with engine.connect() as c:
            return (c.execute(text("SELECT count(*) FROM predictions")).scalar_one(),
                    c.execute(text("SELECT count(*) FROM studies")).scalar_one(),
                    c.execute(text("SELECT count(*) FROM studies WHERE sha256 = :s"), {"s": shared_sha}).scalar_one())
    finally:
        engine.dispose()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its children so far (Linux /proc; NaN elsewhere): the server's
    worker processes are its children."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    try:
        pids = [pid, *(int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]
        for p in pids:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    except (OSError, ValueError, IndexError):
        return float("nan")
    return total


def run_phase(url: str, payloads: list[tuple[str, bytes]], clients: int, requests: int, heatmap: bool,
              max_seconds: float, shared: tuple[str, bytes] | None = None, same_image_clients: int = 0,
              server_pid: int | None = None) -> dict:
    """``clients`` threads, each sending up to ``requests`` uploads (stopping at the deadline); the first
    ``same_image_clients`` send ``shared`` every time (the same file, concurrently). ``names``: the distinct
    uploads that were answered. The CPU time of this process (the load generator, which shares the machine with the
    server) and of the server during the phase say where the cores went."""
    latencies: list[float] = []
    stages: dict[str, list[float]] = {}
    errors: list[str] = []
    answered: set[str] = set()
    lock = threading.Lock()
    deadline = time.monotonic() + max_seconds
    start = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            start.wait()
            for k in range(requests):
                if time.monotonic() > deadline:
                    return
                name, data = shared if i < same_image_clients else payloads[(i * requests + k) % len(payloads)]
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
                        answered.add(name)
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
    t0, client0 = time.perf_counter(), time.process_time()
    server0 = cpu_seconds(server_pid) if server_pid else float("nan")
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    client_cpu = time.process_time() - client0
    server_cpu = (cpu_seconds(server_pid) - server0) if server_pid else float("nan")
    lat = np.array(latencies) if latencies else np.array([float("nan")])
    return {"heatmap": heatmap, "clients": clients, "ok": len(latencies), "errors": len(errors), "names": answered,
            "first_errors": errors[:3], "seconds": round(wall, 2), "throughput_rps": round(len(latencies) / wall, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "max_ms": round(float(lat.max()), 1),
            "cpu_s": {"load_generator": round(client_cpu, 2), "server": round(server_cpu, 2),
                      "available": round(wall * (os.cpu_count() or 1), 2)},
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
    p.add_argument("--threads", type=int, help="`serve --threads` (ONNX Runtime) and OMP_NUM_THREADS (PyTorch) of the server")
    p.add_argument("--workers", type=int, default=1, help="`serve --workers` (default 1)")
    p.add_argument("--db", default="sqlite", help="sqlite (a temporary file, default), postgresql (a temporary "
                                                  "server of its own, needs Debian's postgresql), or a --db URL/path")
    p.add_argument("--same-image-clients", type=int, default=10,
                   help="this many clients upload one and the same image, concurrently (default 10)")
    p.add_argument("--target-p99-ms", type=float, help="fail when the heatmap=false p99 is above this")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args(argv)

    every = sorted(args.images.rglob("*.jpeg"))
    files = every[::max(1, len(every) // args.n_images)][:args.n_images]  # spread over the classes
    payloads = [(f.name, f.read_bytes()) for f in files]
    if not payloads:
        raise SystemExit(f"no .jpeg under {args.images}")
    chosen = set(files)
    shared_file = next(f for f in every if f not in chosen)
    shared = (shared_file.name, shared_file.read_bytes())
    digest = {n: hashlib.sha256(d).hexdigest() for n, d in [*payloads, shared]}
    phases = {"both": [False, True], "true": [True], "false": [False]}[args.heatmap]
    with tempfile.TemporaryDirectory(prefix="pneumoscope-load-") as tmp:
        pg = TempPostgres() if args.db == "postgresql" else None
        db = pg.create_database() if pg else str(Path(tmp) / "load.db") if args.db == "sqlite" else args.db
        port = free_port()
        results = []
        try:
            proc = start_server(Path(args.checkpoint).resolve(), db, port, Path(tmp) / "server.log", args.threads,
                                args.workers)
            url = f"http://127.0.0.1:{port}"
            seen = run_phase(url, payloads, 2, 2, True, 30)["names"]  # warm-up (not counted)
            before = db_counts(db, digest[shared[0]])[0]
            for heatmap in phases:
                r = run_phase(url, payloads, args.clients, args.requests, heatmap, args.max_seconds, shared,
                              args.same_image_clients, proc.pid)
                seen |= r.pop("names")
                rows, studies, shared_studies = db_counts(db, digest[shared[0]])
                expected = len({digest[n] for n in seen})
                r["db_rows_added"], r["studies"], r["shared_image_studies"] = rows - before, studies, shared_studies
                r["db_ok"] = rows - before == r["ok"] and studies == expected and shared_studies == (
                    1 if args.same_image_clients and r["ok"] else shared_studies)
                r["db"], r["workers"] = db.split("://")[0] if "://" in db else "sqlite", args.workers
                before = rows
                results.append(r)
        finally:
            if "proc" in locals():
                proc.terminate()
                proc.wait(30)
            if pg:
                pg.stop()
    fail = False
    for r in results:
        if args.json:
            continue
        print(f"heatmap={str(r['heatmap']).lower():5s} clients={r['clients']:3d} ok={r['ok']:5d} errors={r['errors']:3d} "
              f"{r['throughput_rps']:7.1f} req/s  p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  "
              f"max {r['max_ms']:7.1f} ms  db rows +{r['db_rows_added']}, studies {r['studies']} (shared image: "
              f"{r['shared_image_studies']}) ({'ok' if r['db_ok'] else 'MISMATCH'})")
        print("   server stages p50/p99 ms:", ", ".join(f"{n} {a}/{b}" for n, (a, b) in r["server_stages_p50_p99_ms"].items()))
        c = r["cpu_s"]
        print(f"   CPU seconds: server {c['server']}, load generator {c['load_generator']}, of {c['available']} "
              f"({os.cpu_count()} cores x the phase's wall time)")
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
