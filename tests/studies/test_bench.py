"""pneumoscope bench: one tiny epoch (64 images, 48 px: seed_cnn needs >= 46) per CPU configuration gives a table
row each and a device description."""

import pytest
import torch

from pneumoscope.cli import build_parser
from pneumoscope.studies.bench import (
    bench,
    configurations,
    describe,
    device_description,
    matmul_gflops,
)


def test_device_description_is_filled():
    d = device_description()
    assert d["cpu"] and d["cores"] >= 1 and d["torch"] == torch.__version__
    line = describe(d)
    assert d["cpu"] in line and f"{d['cores']} cores" in line


def test_configurations_cover_threads_precisions_and_cuda():
    cpu = configurations(cuda=False)
    assert {(c["threads"], c["precision"]) for c in cpu} >= {(1, "fp32"), (1, "bf16")}
    assert all(c["device"] == "cpu" for c in cpu)
    gpu = [c for c in configurations(cuda=True) if c["device"] == "cuda"]
    assert [c["precision"] for c in gpu] == ["fp32", "bf16"]


def test_matmul_gflops_is_positive():
    assert matmul_gflops("fp32", n=128, seconds=0.05) > 0.1


def test_tiny_bench_writes_a_row_per_configuration(chest_xray, tmp_path):
    threads = torch.get_num_threads()
    args = build_parser().parse_args(["bench", "--data", str(chest_xray), "--image-size", "48", "--limit", "64",
                              "--batch-size", "16", "--out", str(tmp_path / "bench.md")])
    r = bench(args.data, model=args.model, image_size=args.image_size, limit=args.limit, batch_size=args.batch_size,
              out=args.out)
    assert torch.get_num_threads() == threads  # restored after the 1-thread runs
    want = configurations()
    assert [(x["device"], x["threads"], x["precision"]) for x in r["rows"]] == \
        [(c["device"], c["threads"], c["precision"]) for c in want]
    for row in r["rows"]:
        assert row["seconds_per_epoch"] > 0 and row["images_per_s"] > 0 and row["speedup"] >= 1.0
        assert row["image_size"] == 48 and 0 < row["n_train"] <= 64
    assert min(x["speedup"] for x in r["rows"]) == pytest.approx(1.0)
    md = (tmp_path / "bench.md").read_text()
    assert md == r["markdown"]
    assert r["device"]["cpu"] in md
    table = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(table) == 1 + len(want)  # header + one row per configuration
    for row in r["rows"]:
        assert f"| {row['name']} |" in md
