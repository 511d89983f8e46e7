"""DistributedDataParallel on CPU: `torchrun --nproc_per_node 2 -m pneumoscope train` exits 0, writes one valid
checkpoint, and both ranks end with identical weights (``metrics["weights_digest"]``, computed on every rank)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from pneumoscope.models.checkpoint import load_checkpoint, model_from_checkpoint
from pneumoscope.training.checkpoint import weights_digest

# Runs `pneumoscope train` exactly as `python -m pneumoscope train ...` does (cli.main), and records on every
# rank the metrics that train() returned.
LAUNCH = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    import pneumoscope.training.loop as T
    from pneumoscope.cli import main

    real_train = T.train

    def recording_train(*args, **kwargs):
        m = real_train(*args, **kwargs)
        rank = os.environ["RANK"]
        Path(m["run_dir"], f"rank{rank}.json").write_text(json.dumps({k: v for k, v in m.items() if k != "history"}))
        return m

    T.train = recording_train
    raise SystemExit(main(sys.argv[1:]))
""")


@pytest.fixture(scope="module")
def ddp_run(chest_xray, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    script = out.parent / "launch_ddp.py"
    script.write_text(LAUNCH)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           "train", "--data", str(chest_xray), "--limit", "120", "--image-size", "48", "--epochs", "1",
           "--batch-size", "16", "--threads", "1", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env=env)
    return out, proc


def test_torchrun_exits_zero_with_a_valid_checkpoint(ddp_run):
    out, proc = ddp_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    ck = load_checkpoint(out / "best.pt")
    assert ck["preprocess"]["input_size"] == 48 and ck["label_names"] == ["NORMAL", "PNEUMONIA"]
    assert 0 < ck["threshold"] < 1
    assert all(torch.isfinite(v).all() for v in ck["state_dict"].values() if torch.is_floating_point(v))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_run"] == 1 and metrics["n_train"] > 100
    assert "x2 processes" in proc.stderr  # rank 0 logged the world size
    assert proc.stderr.count("epoch 1/1  loss") == 1  # per-epoch line from rank 0 only


def test_both_ranks_end_with_identical_weights(ddp_run):
    out, proc = ddp_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["weights_digest"] == ranks[1]["weights_digest"]
    assert ranks[0]["val_auc"] == ranks[1]["val_auc"] and ranks[0]["n_train"] == ranks[1]["n_train"]
    # ... and it is the digest of the weights rank 0 saved at the end
    last = model_from_checkpoint(load_checkpoint(out / "last.pt"))
    assert weights_digest(last) == ranks[0]["weights_digest"]
