"""The triage experiment: the reading simulation on hand cases, and one CLI run on real films."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pneumoscope.cli import main
from pneumoscope.inference.assess import reading_key
from pneumoscope.studies.triage import simulate


def test_reading_key_is_the_worklist_rule():
    films = [("NORMAL", 0.4, 0.0), ("PNEUMONIA", 0.7, 1.0), ("not assessed", 0.99, 2.0), ("PNEUMONIA", 0.9, 3.0),
             ("not assessed", 0.1, 0.5)]
    order = sorted(range(5), key=lambda i: reading_key(*films[i]))
    assert order == [3, 1, 4, 2, 0]  # pneumonia by probability, not assessed by arrival, then the rest


def test_simulation_reads_in_arrival_or_worklist_order():
    arrival = np.zeros(4)  # all at once: a queue of 4
    keys = [reading_key(lab, p, i) for i, (lab, p) in enumerate([("NORMAL", 0.2), ("NORMAL", 0.3),
                                                                  ("PNEUMONIA", 0.8), ("PNEUMONIA", 0.95)])]
    read, pos = simulate(arrival, keys, rate=1.0, worklist=False)
    assert list(pos) == [1, 2, 3, 4] and list(read) == [1.0, 2.0, 3.0, 4.0]
    read, pos = simulate(arrival, keys, rate=1.0, worklist=True)
    assert list(pos) == [4, 3, 2, 1]
    # a reader faster than the arrivals never has a queue: both orders are arrival order
    spaced = np.arange(4, dtype=float)
    assert list(simulate(spaced, keys, 2.0, True)[1]) == list(simulate(spaced, keys, 2.0, False)[1]) == [1, 2, 3, 4]


@pytest.mark.slow
def test_triage_command_writes_both_policies(tiny_checkpoint, chest_xray, tmp_path):
    site = tmp_path / "site"
    for c in ("NORMAL", "PNEUMONIA"):
        (site / c).mkdir(parents=True)
        for f in sorted((chest_xray / "train" / c).glob("*.jpeg"))[:15]:
            (site / c / f.name).symlink_to(f)
    out = tmp_path / "triage"
    assert main(["experiment", "triage", "--data", str(site), "--checkpoint", str(tiny_checkpoint), "--out", str(out),
                 "--rates", "0.5,2"]) == 0
    r = json.loads((out / "triage.json").read_text())
    assert r["films"] == 30 and r["pneumonia"] == 15 and len(r["rows"]) == 4
    fifo, work = r["rows"][0], r["rows"][1]
    assert fifo["policy"] == "arrival order" and work["policy"] == "worklist order"
    assert "| worklist order |" in (out / "triage.md").read_text() and (out / "triage.png").stat().st_size > 1000
    assert main(["experiment", "triage", "--data", str(site), "--rates", "0,x", "--out", str(out)]) == 2
