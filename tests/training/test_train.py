"""Training on small real subsets: artefacts, resume after a kill, reload in a fresh process, bad config values."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from pneumoscope.errors import ConfigError
from pneumoscope.models.checkpoint import load_checkpoint
from pneumoscope.training.loop import train

SMALL = dict(model="seed_cnn", image_size=64, limit=160, batch_size=16, threads=2, progress=False, seed=3)


@pytest.fixture(scope="module")
def run(chest_xray, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    metrics = train(dict(SMALL, data=str(chest_xray), epochs=1, out=str(out)))
    return out, metrics


def test_one_epoch_produces_every_artefact(run):
    out, m = run
    for name in ("config.yaml", "history.csv", "history.json", "curves.png", "best.pt", "last.pt", "metrics.json"):
        assert (out / name).stat().st_size > 0, name
    hist = json.loads((out / "history.json").read_text())
    assert len(hist) == 1
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "val_auc", "val_sensitivity", "val_specificity", "seconds"):
        assert np.isfinite(hist[0][key]), key
    assert m["n_val"] > 0 and m["n_train"] > 0 and m["epochs_run"] == 1
    ck = load_checkpoint(out / "best.pt")
    assert 0 < ck["threshold"] < 1 and ck["temperature"] > 0
    assert ck["threshold_info"]["method"] == "youden"
    assert ck["preprocess"]["input_size"] == 64 and ck["label_names"] == ["NORMAL", "PNEUMONIA"]
    assert "train_state" in load_checkpoint(out / "last.pt")
    # the validation split is patient-disjoint from training
    assert "patient-level" in m["validation"]


def test_reload_in_fresh_process_gives_identical_probabilities(run, chest_xray):
    out, _ = run
    from pneumoscope.inference.loader import load

    paths = [str(p) for p in sorted((chest_xray / "train" / "NORMAL").glob("*.jpeg"))[:3]]
    here = [r.probability for r in load(out / "best.pt", device="cpu").predict(paths)]
    code = ("import json,sys; from pneumoscope.inference.loader import load; "
            "print(json.dumps([r.probability for r in load(sys.argv[1], device='cpu').predict(sys.argv[2:])]))")
    there = json.loads(subprocess.run([sys.executable, "-c", code, str(out / "best.pt"), *paths],
                                      capture_output=True, text=True, check=True).stdout)
    assert here == there
    assert len(set(here)) == 3  # three different images, three different probabilities


def test_metrics_at_threshold_equal_a_reload_of_best_checkpoint(run, chest_xray):
    """train() reuses the best epoch's validation logits; reloading best.pt and running it again gives the same."""
    from pneumoscope.config import resolve
    from pneumoscope.data.splits import split_samples
    from pneumoscope.inference.runtime import pick_precision
    from pneumoscope.training.data import decode
    from pneumoscope.training.history import best_val_logits, val_at_threshold

    out, m = run
    cfg = resolve(dict(SMALL, data=str(chest_xray)))
    _, val_s, _, _ = split_samples(cfg)
    va = decode(val_s, 64, cfg, show=False)
    cpu = torch.device("cpu")
    best = load_checkpoint(out / "best.pt")
    again = val_at_threshold(best_val_logits(best, va, cpu, pick_precision("auto", cpu)), va.y.numpy(), best)
    assert again == m["val_at_threshold"]
    assert m["val_at_threshold"]["n"] == m["n_val"]


def test_train_with_prefetch_equals_train_without(run, chest_xray, tmp_path, caplog):
    """Data prepared by a forked process (data/prepare.py) train the very same model as in-process decoding."""
    from pneumoscope.config import resolve
    from pneumoscope.data.prefetch import Prefetch

    out, m = run
    cfg = resolve(dict(SMALL, data=str(chest_xray), epochs=1, out=str(tmp_path / "p")))
    wrong = Prefetch(resolve(dict(SMALL, data=str(chest_xray), seed=4)), 64)  # another split: must be ignored
    right = Prefetch(cfg, 64)
    try:
        with caplog.at_level("INFO", logger="pneumoscope.training"):
            m_wrong = train(dict(cfg.to_dict(), out=str(tmp_path / "w")), prefetch=wrong)
            m_right = train(cfg, prefetch=right)
    finally:
        wrong.close()
        right.close()
    assert "ignoring the prefetched data" in caplog.text
    assert "decoded by a second process" in caplog.text
    a = load_checkpoint(out / "last.pt")["state_dict"]
    for m_other, run_dir in ((m_right, "p"), (m_wrong, "w")):
        b = load_checkpoint(tmp_path / run_dir / "last.pt")["state_dict"]
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
        assert (m_other["val_auc"], m_other["n_train"], m_other["n_val"]) == (m["val_auc"], m["n_train"], m["n_val"])


def test_cli_train_exits_fast_with_every_artefact_and_errors_exit_2(run, chest_xray, tmp_path):
    """`python -m pneumoscope train` (prefetch + exit without interpreter teardown) writes the same run as train()."""
    out, m = run
    cli = tmp_path / "cli"
    args = ["--data", str(chest_xray), "--out", str(cli), "--epochs", "1", "--model", "seed_cnn", "--image-size", "64",
            "--limit", "160", "--batch-size", "16", "--threads", "2", "--seed", "3"]
    r = subprocess.run([sys.executable, "-m", "pneumoscope", "train", *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "decoded by a second process" in r.stderr and "best val AUC" in r.stderr  # logs flushed before exit
    for name in ("config.yaml", "history.csv", "history.json", "curves.png", "best.pt", "last.pt", "metrics.json"):
        assert (cli / name).stat().st_size > 0, name
    assert json.loads((cli / "metrics.json").read_text())["val_auc"] == m["val_auc"]
    a, b = load_checkpoint(out / "last.pt")["state_dict"], load_checkpoint(cli / "last.pt")["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    (tmp_path / "empty").mkdir()
    r = subprocess.run([sys.executable, "-m", "pneumoscope", "train", "--data", str(tmp_path / "empty"),
                        "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert r.returncode == 2 and "empty" in r.stderr and "Traceback" not in r.stderr


def test_reuse_freed_memory_stops_page_faults_on_large_tensors():
    """With glibc's defaults a freed 64 MB tensor goes back to the system and its next allocation page-faults
    again (~16k faults), every time; after reuse_freed_memory() the memory is reused once the heap has grown to fit
    (glibc may first extend it for up to 3 rounds, depending on the heap's address alignment). In a fresh process:
    the allocator's state depends on everything the process allocated before."""
    code = """
import json, resource, torch
from pneumoscope.training.setup import reuse_freed_memory

def faults_of_second_allocation():
    x = torch.ones(2**24)
    del x
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(2**24)
    del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

returned = [faults_of_second_allocation() for _ in range(2)]
on = reuse_freed_memory(True)
print(json.dumps({"on": on, "returned": returned, "kept": [faults_of_second_allocation() for _ in range(8)]}))
"""
    r = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    if not r["on"]:
        pytest.skip("not glibc: no mallopt")
    assert min(r["returned"]) > 8000 and max(r["kept"][4:]) < 1000, r


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_resume_after_kill_equals_straight_run(chest_xray, tmp_path, ema):
    """Killed after an epoch and resumed: the same trained weights, history and (with a weight EMA, restored from
    last.pt) the same best.pt as a straight run."""
    cfg = dict(SMALL, data=str(chest_xray), epochs=4, patience=10, ema=ema)
    straight = train(dict(cfg, out=str(tmp_path / "straight")))
    killed = tmp_path / "killed"
    code = ("import sys, json; from pneumoscope.training.loop import train; "
            "train(json.loads(sys.argv[1]))")
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(dict(cfg, out=str(killed)))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        h = killed / "history.json"
        if h.exists() and h.stat().st_size > 0:
            try:
                if len(json.loads(h.read_text())) >= 1:
                    break
            except json.JSONDecodeError:
                pass
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = load_checkpoint(killed / "last.pt")["epoch"]
    assert done < 4, "the run finished before it could be killed; the test proves nothing"
    resumed = train(resume=str(killed))
    assert resumed["epochs_run"] == straight["epochs_run"] == 4
    a = load_checkpoint(tmp_path / "straight" / "last.pt")["state_dict"]
    b = load_checkpoint(killed / "last.pt")["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert [round(h["val_loss"], 6) for h in resumed["history"]] == [round(h["val_loss"], 6) for h in straight["history"]]
    if ema:  # the average itself was restored, whichever epoch best.pt came from
        a, b = (load_checkpoint(d / "last.pt")["train_state"]["ema"] for d in (tmp_path / "straight", killed))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    a, b = (load_checkpoint(d / "best.pt") for d in (tmp_path / "straight", killed))
    assert a["epoch"] == b["epoch"]
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=0, atol=0, msg=k)


def test_resume_refuses_a_changed_ema_or_layer_decay(chest_xray, tmp_path):
    """A run resumed with the weight average switched on or off, or with other learning-rate groups, would mix two
    recipes in one best.pt: refused by name, before any epoch runs."""
    train(dict(SMALL, data=str(chest_xray), epochs=1, ema=0.9, out=str(tmp_path / "r")))
    with pytest.raises(ConfigError, match="ema"):
        train(resume=str(tmp_path / "r"), ema=0.0)
    with pytest.raises(ConfigError, match="layer_decay"):
        train(resume=str(tmp_path / "r"), layer_decay=0.5)


def test_make_ema_averages_parameters_and_batchnorm_buffers():
    """decay d: the first update copies the weights, each later one keeps d of the average; BatchNorm's running
    statistics are averaged the same way (the average must predict with matching statistics)."""
    from pneumoscope.training.checkpoint import make_ema

    assert make_ema(torch.nn.Linear(2, 1), 0.0) is None
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = make_ema(net, 0.9)
    seen = []
    for value in (1.0, 3.0):
        with torch.no_grad():
            net[0].weight.fill_(value)
            net[1].running_mean.fill_(value)
        ema.update_parameters(net)
        seen.append(value)
    expected = 0.9 * seen[0] + 0.1 * seen[1]
    assert torch.allclose(ema.module[0].weight, torch.full((2, 2), expected))
    assert torch.allclose(ema.module[1].running_mean, torch.full((2,), expected))


def test_ema_run_saves_the_average_it_validated(chest_xray, tmp_path):
    """With ``ema`` best.pt holds the weight average, not the trained weights (last.pt), and it is the model that
    was validated: reloading it reproduces the best epoch's metrics. A bad decay is refused by name."""
    from pneumoscope.config import resolve
    from pneumoscope.data.splits import split_samples
    from pneumoscope.inference.runtime import pick_precision
    from pneumoscope.training.data import decode
    from pneumoscope.training.history import best_val_logits, val_at_threshold

    m = train(dict(SMALL, data=str(chest_xray), epochs=2, patience=10, ema=0.8, out=str(tmp_path / "e")))
    best, last = (load_checkpoint(tmp_path / "e" / f) for f in ("best.pt", "last.pt"))
    assert best["config"]["ema"] == 0.8 and last["train_state"]["ema"] is not None
    if best["epoch"] == last["epoch"]:
        assert any(not torch.equal(best["state_dict"][k], last["state_dict"][k]) for k in best["state_dict"])
    cfg = resolve(dict(SMALL, data=str(chest_xray)))
    va = decode(split_samples(cfg)[1], 64, cfg, show=False)
    cpu = torch.device("cpu")
    again = val_at_threshold(best_val_logits(best, va, cpu, pick_precision("auto", cpu)), va.y.numpy(), best)
    assert again == m["val_at_threshold"] and again["auc"] == pytest.approx(m["val_auc"])
    for bad in (1.0, -0.1):
        with pytest.raises(ConfigError, match="ema"):
            train(dict(SMALL, data=str(chest_xray), ema=bad, out=str(tmp_path / "bad")))


@pytest.mark.parametrize("override,match", [
    (dict(epochs=-1), "epochs"),
    (dict(epochs=0), "epochs"),
    (dict(model="nope"), "unknown model"),
    (dict(image_size=0), "image_size"),
    (dict(val_fraction=1.2), "val_fraction"),
    (dict(threshold="best"), "threshold"),
    (dict(threshold="sensitivity:abc"), "threshold"),  # one rule (config.threshold_target) for config and metrics
    (dict(threshold="sensitivity:1.5"), "threshold"),
    (dict(fold="3/2"), "fold"),
    (dict(fold="1/1"), "fold"),
    (dict(fold="first"), "fold"),
    (dict(imbalance="magic"), "imbalance"),
    (dict(mixup=-0.2), "mixup"),
])
def test_bad_config_values(chest_xray, tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        train(dict(SMALL, data=str(chest_xray), out=str(tmp_path), **override))


def test_train_leaves_the_callers_config_alone_and_records_what_it_derived(chest_xray, tmp_path):
    """``start_run`` derives the run folder and the model's input size into a copy (``Run.cfg``), written to the
    run's config.yaml; the caller's TrainConfig is not changed."""
    import yaml

    from pneumoscope.config import resolve

    cfg = resolve(dict(SMALL, data=str(chest_xray), epochs=1, image_size=None, limit=48, out=str(tmp_path / "r")))
    before = cfg.to_dict()
    m = train(cfg)
    assert cfg.to_dict() == before and cfg.image_size is None
    stored = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert stored["image_size"] == load_checkpoint(tmp_path / "r" / "best.pt")["preprocess"]["input_size"]
    assert stored["out"] == str(tmp_path / "r") == m["run_dir"]


def test_yaml_config_and_flag_override(chest_xray, tmp_path):
    from pneumoscope.config import load_config

    y = tmp_path / "c.yaml"
    y.write_text(f"data: {chest_xray}\nepochs: 7\nimage-size: 96\n")
    c = load_config(y, epochs=3)
    assert (c.epochs, c.image_size, c.data) == (3, 96, str(chest_xray))
    y.write_text("epochz: 3\n")
    with pytest.raises(ConfigError, match="epochz"):
        load_config(y)


def test_ternary_training_reports_and_predicts_three_classes(chest_xray, tmp_path):
    from pneumoscope.evaluation.evaluate import evaluate
    from pneumoscope.inference.loader import load

    m = train(dict(SMALL, data=str(chest_xray), labels="ternary", epochs=1, out=str(tmp_path / "t3")))
    assert m["labels"] == ["NORMAL", "BACTERIAL", "VIRAL"]
    ck = load_checkpoint(tmp_path / "t3" / "best.pt")
    assert ck["arch"]["num_classes"] == 3
    pred = load(tmp_path / "t3" / "best.pt", device="cpu")
    r = pred.predict([sorted((chest_xray / "train" / "PNEUMONIA").glob("*virus*.jpeg"))[0]])[0]
    assert set(r.class_probabilities) == {"NORMAL", "BACTERIAL", "VIRAL"}
    assert abs(sum(r.class_probabilities.values()) - 1) < 1e-5
    assert r.predicted_class in r.class_probabilities
    rep = evaluate(tmp_path / "t3" / "best.pt", chest_xray, tmp_path / "rep", split="validation", progress=False)
    assert 600 < rep["n"] < 900 and len(rep["per_class"]) == 3  # the full validation split (limit not applied)
    assert rep["macro_auc"] is not None and 0 <= rep["macro_auc"] <= 1


def test_mixup_changes_training_reproducibly(run, chest_xray, tmp_path):
    """mixup blends each batch with a shuffled copy (weights and labels): a different model from the plain run of
    the same seed, and the same model again when repeated (its draws come from the epoch's seeded generators)."""
    plain = run[1]
    mixed = [train(dict(SMALL, data=str(chest_xray), epochs=1, mixup=0.4, out=str(tmp_path / f"m{i}"))) for i in (1, 2)]
    assert mixed[0]["weights_digest"] == mixed[1]["weights_digest"] != plain["weights_digest"]
    assert load_checkpoint(tmp_path / "m1" / "best.pt")["config"]["mixup"] == 0.4
    assert np.isfinite(mixed[0]["history"][0]["loss"]) and mixed[0]["history"][0]["loss"] != plain["history"][0]["loss"]
