"""pneumoscope (PyTorch) vs the identical seed_cnn in Keras 3 (TensorFlow backend), on the same data.

Mode A (default): in one process, alternating rounds, the training images/s of the bare model step (normalised
float input, no augmentation, Adam, BCE) and the single-image inference latency (one decoded image, model
call only) of both frameworks, on the same decoded real images and batch size.

Mode B (``--end-to-end``): each framework's usual whole program, as a subprocess, on the full shared training
split: ``pneumoscope train --model seed_cnn --image-size 150 --epochs 2`` vs Keras'
``image_dataset_from_directory`` (on symlinked folders of the same patient-level train/val split) + ``cache()`` +
RandomRotation/RandomZoom/RandomTranslation/RandomContrast/RandomBrightness layers (pneumoscope's default
augmentation) + class weights + ``model.fit`` for 2 epochs.
Wall time (median of ``--rounds`` alternating runs: the Keras program's time varies by up to 1.5x from run to
run here) and validation accuracy (at 0.5, of the epoch with the best validation AUC, as pneumoscope picks it).

Needs the ``bench`` extra: pip install tensorflow-cpu.

    python benchmarks/vs_keras.py                  # mode A
    python benchmarks/vs_keras.py --end-to-end     # mode B (minutes)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray"
MEAN, STD = 0.5, 0.25  # seed_cnn's preprocess


# ------------------------------------------------------------------------------------------- the Keras model
def keras_seed_cnn(size: int, augment: bool = False, rescale: bool = False):
    """pneumoscope's seed_cnn in Keras: 4 x (Conv2D 3x3 valid + ReLU + MaxPool 2), Flatten, Dropout 0.5,
    Dense 128 relu, Dense 64 relu, Dense 1 sigmoid. ``rescale``: the input is 0..255 pixels (normalised inside);
    ``augment`` (needs ``rescale``): Keras' random layers (active in training only) with pneumoscope's default
    ranges, on the 0..255 pixels before normalising: Keras' RandomContrast/RandomBrightness clip to their
    ``value_range`` (default 0..255), as pneumoscope clamps to [0, 1]; on normalised input they would zero every
    pixel below the mean grey."""
    import keras
    from keras import layers

    if augment and not rescale:
        raise ValueError("augment=True needs rescale=True (Keras' augmentation layers work on 0..255 pixels)")
    x = inp = keras.Input((size, size, 1))
    if augment:
        x = layers.RandomRotation(10 / 360, fill_mode="constant")(x)  # fill 0 = black, as pneumoscope's padding
        x = layers.RandomZoom(0.10, fill_mode="constant")(x)
        x = layers.RandomTranslation(0.08, 0.08, fill_mode="constant")(x)
        x = layers.RandomContrast(0.20)(x)
        x = layers.RandomBrightness(0.15)(x)  # +-0.15 of the range, as pneumoscope's brightness=0.15
    if rescale:
        x = layers.Rescaling(1 / (255 * STD), offset=-MEAN / STD)(x)  # (x / 255 - 0.5) / 0.25
    for ch in (32, 64, 128, 128):
        x = layers.Conv2D(ch, 3, padding="valid", activation="relu")(x)
        x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    x = layers.Dropout(0.5)(x)
    x = layers.Dense(128, activation="relu")(x)
    x = layers.Dense(64, activation="relu")(x)
    out = layers.Dense(1, activation="sigmoid")(x)
    return keras.Model(inp, out, name="seed_cnn")


def torch_seed_cnn(size: int):
    from pneumoscope.models.registry import create_model

    return create_model("seed_cnn", num_classes=1, image_size=size)


def param_counts(size: int) -> tuple[int, int]:
    k = keras_seed_cnn(size).count_params()
    t = sum(p.numel() for p in torch_seed_cnn(size).parameters())
    return t, k


# ------------------------------------------------------------------------------------------- mode A
def decoded(data: Path, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """n real images as normalised float32 (n, size, size) and labels (seeded random subset)."""
    from pneumoscope.data.cache import decode_all
    from pneumoscope.data.folders import scan

    samples = scan(data).samples
    pick = sorted(np.random.default_rng(0).choice(len(samples), size=min(n, len(samples)), replace=False))
    d = decode_all([samples[i].path for i in pick], size, progress=False)
    return (d.images.astype(np.float32) / 255 - MEAN) / STD, np.array([samples[i].label for i in pick], np.float32)


def mode_a(args) -> dict:
    import keras
    import tensorflow as tf
    import torch
    import torch.nn.functional as F

    from pneumoscope.training.setup import reuse_freed_memory

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    reuse_freed_memory()  # as `pneumoscope train` does; process-wide, so TensorFlow gets it too
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    size, bs = args.image_size, args.batch_size
    n = args.steps * bs
    x, y = decoded(args.data, n, size)
    t_params, k_params = param_counts(size)
    print(f"seed_cnn at {size} px: PyTorch {t_params:,} parameters, Keras {k_params:,} parameters\n")
    if t_params != k_params:
        raise SystemExit("parameter counts differ: the two models are not the same architecture")

    # ---- contestants: each returns (train images/s over one pass of the n images, single-image latencies)
    def torch_contestant(bf16: bool):
        torch.manual_seed(0)
        model = torch_seed_cnn(size)
        xt = torch.from_numpy(x).unsqueeze(1)
        if bf16:
            model = model.to(memory_format=torch.channels_last)
            xt = xt.contiguous(memory_format=torch.channels_last)
        yt = torch.from_numpy(y)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        amp = dict(device_type="cpu", dtype=torch.bfloat16, enabled=bf16)

        def train_pass() -> float:
            model.train()
            t0 = time.perf_counter()
            for i in range(0, n, bs):
                with torch.autocast(**amp):
                    logits = model(xt[i:i + bs])
                loss = F.binary_cross_entropy_with_logits(logits[:, 0].float(), yt[i:i + bs])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            return n / (time.perf_counter() - t0)

        def latency(k: int) -> list[float]:
            model.eval()
            out = []
            with torch.inference_mode():
                for i in range(k):
                    t0 = time.perf_counter()
                    with torch.autocast(**amp):
                        model(xt[i % n:i % n + 1]).float()
                    out.append(time.perf_counter() - t0)
            return out

        return train_pass, latency

    def keras_contestant(bf16: bool):
        keras.mixed_precision.set_global_policy("mixed_bfloat16" if bf16 else "float32")
        keras.utils.set_random_seed(0)
        model = keras_seed_cnn(size)
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
        xk = x[..., None]

        def train_pass() -> float:
            t0 = time.perf_counter()
            model.fit(xk, y, batch_size=bs, epochs=1, shuffle=False, verbose=0)
            return n / (time.perf_counter() - t0)

        def latency(k: int) -> list[float]:
            out = []
            for i in range(k):
                xi = tf.constant(xk[i % n:i % n + 1])
                t0 = time.perf_counter()
                model(xi, training=False).numpy()
                out.append(time.perf_counter() - t0)
            return out

        keras.mixed_precision.set_global_policy("float32")
        return train_pass, latency

    contestants = {"pytorch fp32": torch_contestant(False), "pytorch bf16+channels_last": torch_contestant(True),
                   "keras fp32": keras_contestant(False), "keras mixed_bfloat16": keras_contestant(True)}
    for train_pass, latency in contestants.values():  # warm-up: graph tracing, allocator, oneDNN primitives
        train_pass()
        latency(5)
    ips = {k: [] for k in contestants}
    lat = {k: [] for k in contestants}
    for r in range(args.rounds):  # alternate, so background load hits every contestant alike
        for name, (train_pass, latency) in contestants.items():
            ips[name].append(train_pass())
            lat[name] += latency(args.latency_iters)
    print(f"Mode A: {args.rounds} alternating rounds of {n} images (batch {bs}), {threads} threads; "
          f"latency = one {size} px image, model call only\n")
    print("| framework | train images/s (median of rounds) | latency p50 ms | latency p99 ms |")
    print("| --- | ---: | ---: | ---: |")
    res = {}
    for name in contestants:
        ms = 1e3 * np.array(lat[name])
        res[name] = {"images_per_s": float(np.median(ips[name])), "p50_ms": float(np.percentile(ms, 50)),
                     "p99_ms": float(np.percentile(ms, 99))}
        print(f"| {name} | {res[name]['images_per_s']:.1f} | {res[name]['p50_ms']:.2f} | {res[name]['p99_ms']:.2f} |")
    best_t = max(res[k]["images_per_s"] for k in res if k.startswith("pytorch"))
    best_k = max(res[k]["images_per_s"] for k in res if k.startswith("keras"))
    print(f"\nbest PyTorch / best Keras training throughput: {best_t / best_k:.2f}x")
    return {"params": t_params, "results": res}


# ------------------------------------------------------------------------------------------- mode B
def split_folders(data: Path, root: Path, size: int) -> tuple[int, int]:
    """pneumoscope's patient-level train/val split of ``data`` as symlinked class folders under root/{train,val}."""
    from pneumoscope.config import resolve
    from pneumoscope.data.splits import split_samples

    train_s, val_s, names, _ = split_samples(resolve(dict(data=str(data), model="seed_cnn", image_size=size)))
    for split, samples in (("train", train_s), ("val", val_s)):
        for s in samples:
            d = root / split / names[s.label]
            d.mkdir(parents=True, exist_ok=True)
            (d / s.path.name).symlink_to(s.path.resolve())
    return len(train_s), len(val_s)


def keras_worker(folder: Path, size: int, epochs: int, batch: int, out: Path) -> None:
    """The usual Keras program (run as a subprocess by mode B): writes per-epoch history to ``out``."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    kw = dict(labels="inferred", label_mode="binary", color_mode="grayscale", image_size=(size, size),
              batch_size=batch, seed=0)
    train = keras.utils.image_dataset_from_directory(folder / "train", shuffle=True, **kw)
    val = keras.utils.image_dataset_from_directory(folder / "val", shuffle=False, **kw)
    counts = [len(list((folder / "train" / c).iterdir())) for c in train.class_names]
    train = train.cache().shuffle(1000, seed=0).prefetch(tf.data.AUTOTUNE)
    val = val.cache().prefetch(tf.data.AUTOTUNE)
    model = keras_seed_cnn(size, augment=True, rescale=True)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy",
                  metrics=["accuracy", keras.metrics.AUC(name="auc")])
    h = model.fit(train, validation_data=val, epochs=epochs, verbose=2,
                  class_weight={0: 1.0, 1: counts[0] / counts[1]})  # = pneumoscope's pos_weight n0/n1
    out.write_text(json.dumps(h.history))


def mode_b(args) -> dict:
    """``args.rounds`` alternating runs of both programs (order swapped every round); medians and their ratio."""
    size, epochs = args.image_size, args.epochs
    runs: dict[str, list[dict]] = {"pneumoscope": [], "keras": []}
    with tempfile.TemporaryDirectory(prefix="vs-keras-") as tmp:
        tmp = Path(tmp)
        n_train, n_val = split_folders(args.data, tmp / "split", size)
        print(f"Mode B: {n_train} training / {n_val} validation images (patient-level split, seed 0), "
              f"{size} px, {epochs} epochs, batch {args.batch_size}, {args.rounds} alternating rounds\n", flush=True)

        def pneumoscope_run() -> dict:
            out = tmp / "pneumoscope"
            cmd = [sys.executable, "-m", "pneumoscope", "train", "--data", str(args.data), "--model", "seed_cnn",
                   "--image-size", str(size), "--epochs", str(epochs), "--batch-size", str(args.batch_size),
                   "--out", str(out)]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True)
            wall = time.perf_counter() - t0
            m = json.loads((out / "metrics.json").read_text())
            shutil.rmtree(out)
            return {"wall_s": wall, "val_accuracy": m["val_accuracy"], "val_auc": m["val_auc"], "best_epoch": m["best_epoch"]}

        def keras_run() -> dict:
            cmd = [sys.executable, __file__, "--keras-worker", str(tmp / "split"), "--image-size", str(size),
                   "--epochs", str(epochs), "--batch-size", str(args.batch_size), "--out", str(tmp / "keras.json")]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True)
            wall = time.perf_counter() - t0
            h = json.loads((tmp / "keras.json").read_text())
            best = int(np.argmax(h["val_auc"]))
            return {"wall_s": wall, "val_accuracy": h["val_accuracy"][best], "val_auc": h["val_auc"][best],
                    "best_epoch": best + 1}

        programs = {"pneumoscope": pneumoscope_run, "keras": keras_run}
        for r in range(args.rounds):
            for name in (("pneumoscope", "keras") if r % 2 == 0 else ("keras", "pneumoscope")):
                runs[name].append(programs[name]())
                print(f"round {r + 1}: {name} {runs[name][-1]['wall_s']:.1f} s", flush=True)
    res = {k: {"wall_s": float(np.median([x["wall_s"] for x in v])), "wall_s_runs": [round(x["wall_s"], 1) for x in v],
               **{m: v[-1][m] for m in ("val_accuracy", "val_auc", "best_epoch")}} for k, v in runs.items()}
    print("\n| program | wall s (median) | wall s (each run) | val accuracy (0.5) | val AUC | best epoch |\n"
          "| --- | ---: | --- | ---: | ---: | ---: |")
    for k, r in res.items():
        print(f"| {k} | {r['wall_s']:.1f} | {', '.join(f'{w:.1f}' for w in r['wall_s_runs'])} | {r['val_accuracy']:.4f} | "
              f"{r['val_auc']:.4f} | {r['best_epoch']} |")
    ratio = res["pneumoscope"]["wall_s"] / res["keras"]["wall_s"]
    print(f"\npneumoscope wall time / Keras wall time (medians) = {ratio:.2f} (target <= 0.33: "
          f"{'met' if ratio <= 1 / 3 else 'MISSED'}); val accuracy {res['pneumoscope']['val_accuracy']:.4f} vs "
          f"{res['keras']['val_accuracy']:.4f} (target: at least as good: "
          f"{'met' if res['pneumoscope']['val_accuracy'] >= res['keras']['val_accuracy'] else 'MISSED'})")
    return {**res, "ratio": ratio}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--image-size", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="mode A threads for both frameworks (default: all cores)")
    ap.add_argument("--steps", type=int, default=8, help="mode A: batches per training pass (default 8)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of both (default 3)")
    ap.add_argument("--latency-iters", type=int, default=50, help="mode A: single-image calls per round")
    ap.add_argument("--end-to-end", action="store_true", help="mode B: whole training programs (minutes)")
    ap.add_argument("--epochs", type=int, default=2, help="mode B epochs (default 2)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--keras-worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.keras_worker:
        keras_worker(args.keras_worker, args.image_size, args.epochs, args.batch_size, args.out)
        return 0
    res = mode_b(args) if args.end_to_end else mode_a(args)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
