"""``pneumoscope experiment triage``: would the reading worklist get pneumonia films read sooner?

A labelled folder is replayed as a day of arrivals: its films arrive at random times (seeded) spread evenly over
``hours``; one reader reads ``reading_rate`` films per hour, always the next one of the queue, under two policies:

- **arrival order** (first in, first out: the study list of before);
- **worklist order** (``inference.assess.WORKLIST_RULE``: likely pneumonia first by calibrated probability, then
  the films the model did not assess, then the rest), the order of the service's ``GET /worklist``.

For the pneumonia films the report gives the median and 90th percentile of the wait (minutes from arrival to being
read) and of the reading position, per reading rate; and the same for the normal films (what they pay for it).
When the reader keeps up with arrivals there is no queue and the order cannot matter; the rates below and above
the arrival rate show where it does.
"""
from __future__ import annotations

import heapq
import json
import logging
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pneumoscope.data.folders import scan
from pneumoscope.errors import ConfigError
from pneumoscope.evaluation.evaluate import evaluation_samples
from pneumoscope.inference.assess import WORKLIST_RULE, reading_key
from pneumoscope.inference.loader import load
from pneumoscope.models.checkpoint import load_checkpoint

log = logging.getLogger(__name__)


def simulate(arrival_h: np.ndarray, keys: list[tuple], rate: float, worklist: bool) -> tuple[np.ndarray, np.ndarray]:
    """(read time in hours, reading position) of every film: one reader, ``rate`` films per hour, the queue in
    arrival order or by ``keys`` (``reading_key`` of each film)."""
    order = np.argsort(arrival_h, kind="stable")
    read = np.zeros(len(arrival_h))
    position = np.zeros(len(arrival_h), dtype=np.int64)
    queue: list = []
    t, nxt = 0.0, 0
    for pos in range(1, len(order) + 1):
        if not queue:  # idle reader: wait for the next arrival
            t = max(t, arrival_h[order[nxt]])
        while nxt < len(order) and arrival_h[order[nxt]] <= t:
            i = order[nxt]
            heapq.heappush(queue, (keys[i] if worklist else (arrival_h[i],), i))
            nxt += 1
        _, i = heapq.heappop(queue)
        t += 1.0 / rate
        read[i], position[i] = t, pos
    return read, position


def _stats(wait_min: np.ndarray, position: np.ndarray) -> dict:
    return {"n": int(wait_min.size), "wait_median_min": float(np.median(wait_min)),
            "wait_p90_min": float(np.quantile(wait_min, 0.9)), "position_median": float(np.median(position)),
            "position_p90": float(np.quantile(position, 0.9))}


def triage(data: str | Path, out: str | Path, checkpoint: str | Path | None = None, hours: float = 8.0,
           rates: tuple[float, ...] = (0.8, 1.0, 1.25), seed: int = 0, split: str | None = None) -> dict:
    """Predict every film of ``data`` (NORMAL/ PNEUMONIA/ or a split layout: all films; ``split="validation"``: the
    checkpoint's own validation split of its training folder ``data``), replay them as a day and tabulate both
    policies at reading rates ``rates`` x the arrival rate; writes triage.md, .json and .png."""
    if hours <= 0 or not rates or any(r <= 0 for r in rates):
        raise ConfigError(f"--hours {hours} and --rates {rates} must be > 0")
    predictor = load(checkpoint)
    if split == "validation":
        samples, _ = evaluation_samples(load_checkpoint(predictor.info["checkpoint"]), data)
    elif split is None:
        samples = scan(data).samples
    else:
        raise ConfigError(f"--split {split!r} is invalid: use validation, or leave it out for every film of --data")
    results = predictor.predict([s.path for s in samples])
    ok = [(s, r) for s, r in zip(samples, results) if r.error is None]
    y = np.array([s.label for s, _ in ok])
    rng = np.random.default_rng(seed)
    arrival = np.sort(rng.uniform(0, hours, len(ok)))[rng.permutation(len(ok))]
    keys = [reading_key(r.label, r.score, a)
            for (_, r), a in zip(ok, arrival)]
    arrival_rate = len(ok) / hours
    rows, waits = [], {}
    for mult in rates:
        rate = mult * arrival_rate
        for policy in ("arrival order", "worklist order"):
            read, pos = simulate(arrival, keys, rate, policy == "worklist order")
            wait = (read - arrival) * 60.0
            waits[(mult, policy)] = wait[y == 1]
            rows.append({"reading_rate_per_h": rate, "rate_vs_arrivals": mult, "policy": policy,
                         "pneumonia": _stats(wait[y == 1], pos[y == 1]), "normal": _stats(wait[y == 0], pos[y == 0])})
    labels = [r.label for _, r in ok]
    report = {"data": str(data), "films": len(ok), "pneumonia": int(y.sum()), "hours": hours,
              "arrivals_per_h": arrival_rate, "seed": seed, "rule": WORKLIST_RULE,
              "labels": {k: labels.count(k) for k in sorted(set(labels))}, "model": predictor.info["checkpoint"],
              "split": split,
              "rows": rows}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "triage.json").write_text(json.dumps(report, indent=2))
    (out / "triage.md").write_text(markdown(report))
    _plot(waits, out / "triage.png")
    return report


def markdown(r: dict) -> str:
    what = "the validation split" if r.get("split") == "validation" else "every film"
    lines = [f"# Triage: {r['films']} films ({what}) of `{r['data']}` ({r['pneumonia']} pneumonia) over {r['hours']:g} h "
             f"({r['arrivals_per_h']:.0f} arrivals/h, seed {r['seed']})", "",
             f"Model labels: {r['labels']}. Worklist order: {r['rule']}.", "",
             "| reading rate (films/h) | × arrivals | policy | pneumonia wait median / p90 (min) | pneumonia position "
             "median / p90 | normal wait median / p90 (min) |", "| ---: | ---: | --- | --- | --- | --- |"]
    for x in r["rows"]:
        p, n = x["pneumonia"], x["normal"]
        lines.append(f"| {x['reading_rate_per_h']:.0f} | {x['rate_vs_arrivals']:g} | {x['policy']} | "
                     f"{p['wait_median_min']:.0f} / {p['wait_p90_min']:.0f} | {p['position_median']:.0f} / "
                     f"{p['position_p90']:.0f} | {n['wait_median_min']:.0f} / {n['wait_p90_min']:.0f} |")
    return "\n".join(lines) + "\n"


def _plot(waits: dict, path: Path) -> None:
    fig = Figure(figsize=(6, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for (mult, policy), w in waits.items():
        ax.plot(np.sort(w), np.linspace(0, 1, len(w)), "-" if policy == "worklist order" else "--",
                label=f"{policy}, reading {mult:g}x arrivals")
    ax.set(xlabel="minutes from arrival to read (pneumonia films)", ylabel="fraction read", title="Triage")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=100)
