"""Speed benchmark of the NumPy CNN: every network, every layer, all figures from ONE run.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE make bench     # the recorded run (see README.md)
    python benchmarks/bench.py                  # full run (about 5 minutes), writes benchmarks/results.json
    python benchmarks/bench.py --quick          # smoke run for CI (< 1 min), no epochs
    python benchmarks/bench.py --markdown       # print the README's speed table from results.json

For each network in NETWORKS (one line each): a training step and inference at batch 64 as
GFLOP/s and as a fraction of the float32 2048^3 GEMM rate measured in the same run; per layer,
forward and backward milliseconds and GFLOP/s beside a GEMM of that layer's own shape; a
training epoch (seconds, peak memory) in a subprocess. Medians over repeats. See README.md here.
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import hashlib
import importlib
import inspect
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BATCH = 64
GEMM_N = 2048          # the ceiling: a float32 GEMM_N^3 product, timed beside every measurement
BLAS_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")


# ----------------------------------------------------------------------------- the networks

@dataclass
class Epoch:
    """One ``cnn_train.fit`` epoch on synthetic data, as the report trains the network."""
    images: int
    optimizer: str                    # an expression in T, e.g. "T.Adam(1e-3)"
    augment: str = "None"             # an expression in T, e.g. "T.augmentation(crop=2)"
    targets: dict = field(default_factory=dict)
    batch: int = BATCH
    fit: str = "{}"                   # an expression giving more fit keywords, e.g. "dict(ema=0.998)"


@dataclass
class Network:
    description: str
    build: str                        # an expression in M and L that builds the model
    input_shape: tuple                # one example, NCHW without N
    targets: dict = field(default_factory=dict)
    epoch: Epoch | None = None


CIFAR = ("M.conv_net(in_channels=3, input_size=32, channels=(32, 64, 128), convs_per_block=2, "
         "batchnorm=True, hidden=0, dropout=0.3, seed=0)")
# The recipe's stem is frozen (whitening filters from training images; here from synthetic ones,
# which gives the same shapes and work): a training step has no backward pass below block 1.
CIFAR_NET = "M.cifar_net(whiten=np.random.default_rng(0).standard_normal((2000, 3, 32, 32), dtype=np.float32), seed=0)"
CIFAR_SGD = "T.SGD(0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)"
# One line per network: "cifar_net" is the network the accuracy issue settled on (airbench-like).
NETWORKS = {
    "mnist": Network("MNIST default network (mnist_cnn)", "M.mnist_cnn(seed=0)", (1, 28, 28),
                     {"training_fraction_of_gemm": 0.30, "inference_fraction_of_gemm": 0.45},
                     Epoch(55_000, "T.Adam(1e-3)", "T.augmentation(crop=2)", {"seconds": 10.0})),
    "mnist_v2": Network("MNIST network of the accuracy work (mnist_net_v2, the report's recipe: batch 128, "
                        "averaged weights, label smoothing; target: its 9 epochs in 5 minutes)", "M.mnist_net_v2(seed=0)",
                        (1, 28, 28), {"training_fraction_of_gemm": 0.30, "inference_fraction_of_gemm": 0.45},
                        Epoch(55_000, "T.SGD(0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)",
                              "T.augmentation(crop=2)", {"seconds": 300 / 9}, batch=128,
                              fit="dict(ema=0.998, label_smoothing=0.1)")),
    "cifar": Network("CIFAR network of the speed issue (notebook 4's until 2026-11-25: 3 blocks of 2 x conv-BN-ReLU, "
                     "32/64/128 channels)", CIFAR,
                     (3, 32, 32), {"training_fraction_of_gemm": 0.45, "inference_fraction_of_gemm": 0.45},
                     Epoch(45_000, CIFAR_SGD, "T.augmentation(crop=4, flip=True)",
                           {"seconds": 60.0, "peak_rss_mb": 2000.0})),
    "cifar_net": Network("CIFAR network of the accuracy work (cifar_net as the report's recipe trains it: the "
                         "frozen 2x2 whitening stem, 3 blocks 64/128/256; batch 128, averaged weights, "
                         "label smoothing)", CIFAR_NET, (3, 32, 32),
                         {"training_fraction_of_gemm": 0.45, "inference_fraction_of_gemm": 0.45},
                         Epoch(45_000,                                          # CIFAR_RECIPE's optimiser
                               "T.SGD(0.1875, momentum=0.85, nesterov=True, weight_decay=1.33e-3)",
                               "T.augmentation(crop=2, flip=True)", {"seconds": 60.0, "peak_rss_mb": 2000.0},
                               batch=128, fit="dict(ema=0.998, label_smoothing=0.2)")),
    "rows": Network("row-sequence network (notebook 7: rows as 32 vectors of 96, Conv1D blocks 128/256/256)",
                    "M.cifar_rows_conv1d(seed=0)", (3, 32, 32)),    # He start, no Scale(1/9): the same work
}
STEP_OPTIMIZER = "T.SGD(0.01, momentum=0.9)"           # the training step: SGD with momentum
LOOP_NETWORK, LOOP_SPEEDUP_TARGET = "mnist", 100.0       # loop vs vectorized, conv and pool layers

FULL = dict(gemm_repeats=7, warmup=5, steps=60, infer_images=5_000, infer_repeats=5, layer_repeats=15,
            gemm_shape_repeats=5, loop_batch=2, loop_min_s=0.2, epochs=True)
QUICK = dict(gemm_repeats=3, warmup=2, steps=6, infer_images=512, infer_repeats=1, layer_repeats=3,
             gemm_shape_repeats=2, loop_batch=1, loop_min_s=0.0, epochs=False)


def load_code(code_dir):
    """Import the project's modules (C, L, M, T) from ``code_dir`` (default: this repository)."""
    sys.path.insert(0, str(code_dir))
    return [importlib.import_module(name) for name in ("cnn_core", "cnn_layers", "cnn_model", "cnn_train")]


def build(net, M, L):
    return eval(net.build, {"M": M, "L": L, "np": np})


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def synthetic(n, shape, seed):
    """Random normal float32 images (made in float32: no float64 copy) and labels 0..9."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n,) + tuple(shape), dtype=np.float32), rng.integers(0, 10, n)


def spread(times):
    """Median and the 10th/90th percentiles of a list of seconds (the noise of the machine)."""
    q = np.percentile(times, [10, 50, 90])
    return {"median_s": float(q[1]), "p10_s": float(q[0]), "p90_s": float(q[2]), "n": len(times)}


# ----------------------------------------------------------------------------- counting

def layer_macs(layer, L, out_shape):
    """Multiply-adds of a layer's matrix products for one batch: (forward, backward).
    Conv2D/Conv1D: N * output positions * W.size; Dense: N * W.size; backward = dW + dX, 2x."""
    if isinstance(layer, (L.Conv2D, L.Conv1D)):
        macs = int(np.prod(out_shape[:1] + out_shape[2:])) * layer.params["W"].size
    elif isinstance(layer, L.Dense):
        macs = out_shape[0] * layer.params["W"].size
    else:
        return 0, 0
    return macs, 2 * macs


def first_trained_index(model):
    """The first layer with trained parameters: a training step skips its input gradient and
    runs no backward pass below it (``Sequential.backward(..., input_grad=False)``)."""
    return next((i for i, layer in enumerate(model.layers)
                 if layer.params and getattr(layer, "trainable", True)), 0)


def gemm_shapes(layer, L, in_shape, out_shape):
    """The GEMMs a layer's im2col formulation does: {"fwd": (m, k, n), "dW": ..., "dX": ...}."""
    if isinstance(layer, (L.Conv2D, L.Conv1D)):
        F, C = layer.params["W"].shape[:2]
        window = int(np.prod(layer.params["W"].shape[2:]))
        rows = int(np.prod(out_shape[:1] + out_shape[2:]))
        in_rows = int(np.prod(in_shape[:1] + in_shape[2:]))
        stride_1 = np.all(np.asarray(layer.stride) == 1)             # Conv2D: a pair; Conv1D: an int
        return {"fwd": (rows, C * window, F), "dW": (F, rows, C * window),       # dW^T = g^T @ cols
                # dX: stride 1, a convolution of the padded gradient (K = F*window); else g @ W (col2im)
                "dX": (in_rows, F * window, C) if stride_1 else (rows, F, C * window)}
    if isinstance(layer, L.Dense):
        N, (D, K) = out_shape[0], layer.params["W"].shape
        return {"fwd": (N, D, K), "dW": (D, N, K), "dX": (N, K, D)}
    return {}


def bench_shape_rates(rows, cfg, n=GEMM_N):
    """Rounds of one float32 n^3 GEMM followed by one plain GEMM of every distinct product
    shape of the per-layer ``rows``: each round's shapes and ceiling share a moment of the
    machine, whose rate drifts by a third within a minute. Fills the rows' ``gemm_gflops``
    and ``gemm_bwd_gflops`` with median rates; returns ``products_fraction(keys, macs)``:
    the median over the rounds of 2 * macs / (that round's time of the products ``keys``) /
    (that round's n^3 rate), the fraction of the ceiling a step doing nothing but those
    products, each at its shape's plain-GEMM speed, would reach."""
    rng = np.random.default_rng(0)
    shapes = {tuple(mkn) for row in rows for mkn in row["gemm_shapes"].values()} | {(n, n, n)}
    operands = {mkn: (rng.standard_normal(mkn[:2], dtype=np.float32), rng.standard_normal(mkn[1:], dtype=np.float32),
                      np.empty((mkn[0], mkn[2]), np.float32)) for mkn in shapes}
    times = {mkn: [] for mkn in shapes}
    for round_ in range(1 + cfg["gemm_shape_repeats"]):             # round 0: warm-up
        for mkn in sorted(shapes, key=lambda mkn: mkn != (n, n, n)):   # the ceiling first
            a, b, out = operands[mkn]
            t = timed(lambda: np.matmul(a, b, out=out))
            if round_:
                times[mkn].append(t)
    rate = {mkn: 2 * math.prod(mkn) / statistics.median(t) / 1e9 for mkn, t in times.items()}
    for row in rows:
        mkn = {k: tuple(v) for k, v in row["gemm_shapes"].items()}
        row["gemm_gflops"] = {k: rate[v] for k, v in mkn.items()}
        bwd = [k for k in ("dW", "dX") if k in mkn]
        # the backward's GEMMs at their own rates: the time they would take, as a rate
        row["gemm_bwd_gflops"] = (2 * row["bwd_macs"] / sum(2 * math.prod(mkn[k]) / rate[mkn[k]] / 1e9 for k in bwd)
                                  / 1e9 if bwd else None)

    def products_fraction(keys, macs):
        used = [tuple(v) for row in rows for k, v in row["gemm_shapes"].items() if k in keys]
        return statistics.median(2 * macs / sum(times[mkn][r] for mkn in used) / (2 * n ** 3 / times[(n, n, n)][r])
                                 for r in range(cfg["gemm_shape_repeats"]))
    return products_fraction


# ----------------------------------------------------------------------------- measurements

def gemm_seconds(n=GEMM_N):
    """A function timing one float32 n^3 GEMM (seconds), operands made once."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    c = np.empty((n, n), np.float32)
    np.matmul(a, b, out=c)
    return lambda: timed(lambda: np.matmul(a, b, out=c))


def bench_gemm(n, repeats):
    """Best-of-``repeats`` float32 n x n @ n x n after one warm-up: the BLAS ceiling."""
    gemm = gemm_seconds(n)
    times = [gemm() for _ in range(repeats)]
    return {"n": n, "repeats": repeats, "best_s": min(times), "median_s": statistics.median(times),
            "gflops": 2 * n ** 3 / min(times) / 1e9, "median_gflops": 2 * n ** 3 / statistics.median(times) / 1e9}


def training_step(model, L, T):
    """One step as ``cnn_train.fit`` takes it: forward, loss, backward without the input
    gradient, optimiser update."""
    loss_fn, optimizer = L.SoftmaxCrossEntropy(), eval(STEP_OPTIMIZER, {"T": T})

    def step(xb, yb):
        loss_fn.forward(model.forward(xb, training=True), yb)
        model.backward(loss_fn.backward(), input_grad=False)
        optimizer.step(model)
    return step


ROUND_STEPS = 10        # a 2048^3 GEMM is timed before every this many training steps


def bench_training(model, L, T, shape, warmup, steps, gemm):
    """Rounds [(GEMM seconds, [step seconds, ...]), ...]: a GEMM (``gemm()``) timed before
    every ROUND_STEPS training steps, over 8 synthetic batches cycled, after ``warmup`` steps."""
    xs, ys = synthetic(8 * BATCH, shape, seed=1)
    step, rounds = training_step(model, L, T), []
    for s in range(warmup + steps):
        if s >= warmup and (s - warmup) % ROUND_STEPS == 0:
            rounds.append((gemm(), []))
        i = (s % 8) * BATCH
        t = timed(lambda: step(xs[i:i + BATCH], ys[i:i + BATCH]))
        if s >= warmup:
            rounds[-1][1].append(t)
    return rounds


def bench_inference(model, shape, n_images, repeats, gemm):
    """Rounds [(GEMM seconds, [seconds]), ...]: ``repeats`` passes of ``model.predict_proba``
    (its default batches of 64) on n_images, each after a GEMM (``gemm()``)."""
    x, _ = synthetic(n_images, shape, seed=2)
    model.predict_proba(x[:256])                                                    # warm-up
    return [(gemm(), [timed(lambda: model.predict_proba(x))]) for _ in range(repeats)]


def fraction_of_gemm(flop, rounds, n=GEMM_N):
    """Median over ``rounds`` of (flop / the round's median time) / (the round's n^3 GEMM
    rate): each rate against the machine's speed of its moment."""
    return statistics.median(flop / statistics.median(ts) / (2 * n ** 3 / g) for g, ts in rounds)


def trace(model, L, x, y):
    """Input and output gradient of every layer in one training step of the real network."""
    inputs, douts = [], [None] * len(model.layers)
    for layer in model.layers:
        inputs.append(x)
        x = layer.forward(x, training=True)
    loss_fn = L.SoftmaxCrossEntropy()
    loss_fn.forward(x, y)
    g = loss_fn.backward()
    for i in reversed(range(len(model.layers))):
        douts[i] = g
        g = model.layers[i].backward(g)
    return inputs, douts


def time_layer(layer, x, dout, repeats, input_grad=True, min_s=0.0, max_repeats=None):
    """Median forward(training=True) and backward times, alternating; at least ``repeats``
    times and until ``min_s`` seconds are spent (at most ``max_repeats``: for the slow loops)."""
    backward = (lambda: layer.backward(dout)) if input_grad else (lambda: layer.backward(dout, input_grad=False))
    fwd, bwd = [], []
    while len(fwd) < repeats or (sum(fwd) + sum(bwd) < min_s and len(fwd) < (max_repeats or repeats)):
        fwd.append(timed(lambda: layer.forward(x, training=True)))
        bwd.append(timed(backward))
    return statistics.median(fwd), statistics.median(bwd)


def bench_layers(model, L, shape, cfg):
    """Per-layer MACs, times and GEMM-of-the-same-shape rates, vectorized, batch 64. The first
    layer with weights is timed without its input gradient, as a training step runs it."""
    x, y = synthetic(BATCH, shape, seed=4)
    inputs, douts = trace(model, L, x, y)
    first, rows = first_trained_index(model), []
    for i, layer in enumerate(model.layers):
        in_shape, out_shape = inputs[i].shape, douts[i].shape
        fwd_macs, bwd_macs = layer_macs(layer, L, out_shape)
        shapes = gemm_shapes(layer, L, in_shape, out_shape)
        input_grad = i > first
        if i == first:
            bwd_macs -= fwd_macs                                     # no dX product
            shapes.pop("dX", None)
        elif i < first:                                              # no backward pass at all
            bwd_macs = 0
            shapes = {k: v for k, v in shapes.items() if k == "fwd"}
        layer.forward(inputs[i], training=True)                      # warm-up (workspace, caches)
        if i >= first:
            layer.backward(douts[i]) if input_grad else layer.backward(douts[i], input_grad=False)
            vf, vb = time_layer(layer, inputs[i], douts[i], cfg["layer_repeats"], input_grad)
        else:
            vf, vb = statistics.median(timed(lambda: layer.forward(inputs[i], training=True))
                                       for _ in range(cfg["layer_repeats"])), 0.0
        rows.append({
            "index": i, "name": f"{i} {layer.label()}", "type": type(layer).__name__,
            "input_shape": list(in_shape), "output_shape": list(out_shape), "input_grad": input_grad,
            "fwd_macs": fwd_macs, "bwd_macs": bwd_macs, "fwd_s": vf, "bwd_s": vb,
            "fwd_gflops": 2 * fwd_macs / vf / 1e9 if fwd_macs else None,
            "bwd_gflops": 2 * bwd_macs / vb / 1e9 if bwd_macs else None, "backward": i >= first,
            "gemm_shapes": {k: list(v) for k, v in shapes.items()},         # rates: bench_shape_rates
            "has_loop": hasattr(layer, "impl")})
    return rows


def bench_loops(model, L, shape, layer_rows, cfg):
    """Loop vs vectorized time of the conv and pool layers on a small batch, scaled to 64."""
    x, y = synthetic(BATCH, shape, seed=4)
    inputs, douts = trace(model, L, x, y)
    nb, out = cfg["loop_batch"], []
    model.set_impl("loop")
    try:
        for row, layer in zip(layer_rows, model.layers):
            if not row["has_loop"] or row["type"] not in ("Conv2D", "MaxPool2D", "AvgPool2D"):
                continue
            i = row["index"]
            log(f"  loop {row['name']} on {nb} example(s)")
            lf, lb = time_layer(layer, inputs[i][:nb], douts[i][:nb], 1, True, cfg["loop_min_s"], 5)
            scale = BATCH / nb                                       # the loops are linear in N
            vf, vb = row["fwd_s"], row["bwd_s"]
            if not row["input_grad"]:                                # compare like with like
                model.set_impl("vectorized")
                vf, vb = time_layer(layer, inputs[i], douts[i], cfg["layer_repeats"])
                model.set_impl("loop")
            out.append({"name": row["name"], "loop_batch": nb, "loop_fwd_s": lf * scale, "loop_bwd_s": lb * scale,
                        "vec_fwd_s": vf, "vec_bwd_s": vb, "speedup_fwd": lf * scale / vf,
                        "speedup_bwd": lb * scale / vb, "speedup_total": (lf + lb) * scale / (vf + vb)})
    finally:
        model.set_impl("vectorized")
    return out


def bench_network(name, net, cfg, code):
    """Every measurement of one network. Its fractions of the GEMM rate are medians of
    rounds, each against a 2048^3 GEMM timed at its start: on a shared machine the
    ceiling itself moves (163 to 283 GFLOP/s within one run on 2026-11-25; 248 to 359
    between networks on 2026-11-26, which moved cifar_net's fraction from 30 % to 43 %
    with one ceiling per network)."""
    C, L, M, T = code
    gemm = gemm_seconds()
    log(f"{name}: training steps (a GEMM before every {ROUND_STEPS}) ...")
    model = build(net, M, L)
    train_rounds = bench_training(model, L, T, net.input_shape, cfg["warmup"], cfg["steps"], gemm)
    log(f"{name}: inference ...")
    infer_rounds = bench_inference(model, net.input_shape, cfg["infer_images"], cfg["infer_repeats"], gemm)
    times, infer = ([t for _, ts in rounds for t in ts] for rounds in (train_rounds, infer_rounds))
    rates = [2 * GEMM_N ** 3 / g / 1e9 for g, _ in train_rounds + infer_rounds]     # in time order
    gemm_record = {"n": GEMM_N, "timed": "before every round of training steps and every inference pass",
                   "gflops_each": rates, "gflops": statistics.median(rates)}
    log(f"{name}: layers ...")
    layers = bench_layers(model, L, net.input_shape, cfg)
    log(f"{name}: GEMMs of the layers' shapes ...")
    products_fraction = bench_shape_rates(layers, cfg)
    fwd_macs = sum(r["fwd_macs"] for r in layers)
    step_macs = fwd_macs + sum(r["bwd_macs"] for r in layers)      # the first layer's dX is already left out
    tr = spread(times)
    gflops = 2 * step_macs / tr["median_s"] / 1e9
    training = dict(tr, batch=BATCH, optimizer=STEP_OPTIMIZER, images_per_s=BATCH / tr["median_s"],
                    macs_per_step=step_macs, gflops=gflops,
                    fraction_of_gemm=fraction_of_gemm(2 * step_macs, train_rounds),
                    products_bound_fraction=products_fraction(("fwd", "dW", "dX"), step_macs))
    inf = spread(infer)
    n = cfg["infer_images"]
    gflops = 2 * fwd_macs / BATCH * n / inf["median_s"] / 1e9
    batch = inspect.signature(M.Sequential.predict_proba).parameters["batch_size"].default
    inference = dict(inf, images=n, batch=batch, images_per_s=n / inf["median_s"], macs_per_image=fwd_macs // BATCH,
                     gflops=gflops, fraction_of_gemm=fraction_of_gemm(2 * fwd_macs / BATCH * n, infer_rounds),
                     products_bound_fraction=products_fraction(("fwd",), fwd_macs))
    for key, part in (("training_fraction_of_gemm", training), ("inference_fraction_of_gemm", inference)):
        if key in net.targets:
            part.update(target=net.targets[key], meets_target=part["fraction_of_gemm"] >= net.targets[key])
    result = {"description": net.description, "build": net.build, "input_shape": list(net.input_shape),
              "gemm": gemm_record,
              "parameters": int(sum(p.size for layer in model.layers for p in layer.params.values())),
              "training": training, "inference": inference, "layers": layers, "epoch": None,
              "workspace_mb": sum(layer.work.nbytes() for layer in model.layers
                                  if "_work" in vars(layer) and hasattr(layer.work, "nbytes")) / 1e6}
    if name == LOOP_NETWORK and cfg["loop_batch"]:
        log(f"{name}: loop versions ...")
        result["loop_vs_vectorized"] = bench_loops(model, L, net.input_shape, layers, cfg)
    return result


def epoch_child(name, code_dir):
    """Run in a subprocess: one ``cnn_train.fit`` epoch of network ``name`` on synthetic data as
    the report trains it; prints JSON (seconds, steady-state estimate, peak resident memory)."""
    C, L, M, T = load_code(code_dir)
    net = NETWORKS[name]
    spec = net.epoch
    model = build(net, M, L)
    x, y = synthetic(spec.images, net.input_shape, seed=3)
    augment = eval(spec.augment, {"T": T})
    stamps = []

    def stamped(xb, rng):                    # fit calls augment once per batch: a free per-step clock
        stamps.append(time.perf_counter())
        return augment(xb, rng) if augment else xb
    history = T.fit(model, x, y, eval(spec.optimizer, {"T": T}), epochs=1, batch_size=spec.batch, augment=stamped,
                    progress=False, log=None, **eval(spec.fit))
    steps = np.diff(stamps + [time.perf_counter()])
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss          # KiB on Linux, bytes on macOS
    print(json.dumps({"images": spec.images, "batch": spec.batch, "optimizer": spec.optimizer, "augment": spec.augment,
                      "fit": spec.fit,
                      "data_mb": x.nbytes / 1e6, "seconds": history.seconds[0], "steps": len(steps),
                      "median_step_s": float(np.median(steps)),
                      "steady_estimate_s": float(np.median(steps)) * len(steps),
                      "peak_rss_mb": (maxrss if sys.platform == "darwin" else maxrss * 1024) / 1e6}))


def bench_epoch(name, code_dir):
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--epoch-child", name,
                           "--code", str(code_dir)], cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"epoch subprocess for {name} failed:\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    targets = NETWORKS[name].epoch.targets
    result["targets"] = targets
    result["meets_target"] = all(result[k] <= v for k, v in targets.items())
    return result


# ----------------------------------------------------------------------------- machine and BLAS

def openblas_libraries():
    """Yield (path, ctypes library) for each OpenBLAS bundled with NumPy's wheel that loads."""
    here = os.path.dirname(np.__file__)
    for path in (glob.glob(os.path.join(here, os.pardir, "numpy.libs", "*openblas*"))
                 + glob.glob(os.path.join(here, ".dylibs", "*openblas*"))):
        try:
            yield path, ctypes.CDLL(path)
        except OSError:
            continue


def openblas_info():
    """OpenBLAS's own report of the kernel it runs (core name, configuration, threads), read
    from NumPy's bundled library with ctypes; None where not available (another BLAS)."""
    for path, lib in openblas_libraries():
        info = {"library": os.path.basename(path)}
        for key, names, restype in (("corename", ("scipy_openblas_get_corename64_", "openblas_get_corename64_",
                                                  "openblas_get_corename"), ctypes.c_char_p),
                                    ("config", ("scipy_openblas_get_config64_", "openblas_get_config64_",
                                                "openblas_get_config"), ctypes.c_char_p),
                                    ("threads", ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_",
                                                 "openblas_get_num_threads"), ctypes.c_int)):
            for fname in names:
                fn = getattr(lib, fname, None)
                if fn is not None:
                    fn.restype = restype
                    value = fn()
                    info[key] = value.decode() if isinstance(value, bytes) else value
                    break
        return info
    return None


def cpu_busy(seconds=0.5):
    """Fraction of all CPUs busy (or stolen by the hypervisor) while we sleep: other work on the
    machine that adds noise. Linux only (/proc/stat), else None."""
    def snapshot():
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
        return sum(ticks), ticks[3] + ticks[4]                            # total, idle + iowait
    try:
        (t0, i0), _, (t1, i1) = snapshot(), time.sleep(seconds), snapshot()
    except (OSError, ValueError):
        return None
    return 1 - (i1 - i0) / max(t1 - t0, 1)


def machine_info(code_dir):
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "numpy": np.__version__, "blas": None,
            "blas_env": {k: os.environ.get(k) for k in BLAS_ENV}, "openblas": openblas_info()}
    try:
        info["blas"] = np.show_config(mode="dicts").get("Build Dependencies", {}).get("blas")
    except (TypeError, AttributeError):                                   # numpy < 1.26
        pass

    def git(*args):
        try:
            out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
            return out.stdout.strip() if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None
    info["cpu_busy_before"] = cpu_busy()
    info["git_commit"] = git("rev-parse", "--short", "HEAD")
    info["code"] = str(code_dir)
    info["code_sha256"] = {name: hashlib.sha256((Path(code_dir) / name).read_bytes()).hexdigest()[:16]
                           for name in ("cnn_core.py", "cnn_layers.py", "cnn_model.py")}  # may be uncommitted
    status = git("status", "--porcelain", "--untracked-files=no")
    info["git_dirty"] = None if status is None else bool(status)
    return info


def kernel_line(m):
    ob, env = m.get("openblas") or {}, m.get("blas_env") or {}
    set_vars = ", ".join(f"{k}={v}" for k, v in env.items() if v is not None) or "none set"
    return f"OpenBLAS core {ob.get('corename', '?')}, {ob.get('threads', '?')} threads (BLAS variables: {set_vars})"


# ----------------------------------------------------------------------------- reporting

def table(headers, rows, align=None):
    """Plain-text table; ``align`` has one 'l' or 'r' per column (default: first left, rest right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    cells = [list(map(str, headers))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[k]) for r in cells) for k in range(len(headers))]
    fmt = lambda r: "  ".join(c.ljust(w) if a == "l" else c.rjust(w)
                              for c, w, a in zip(r, widths, align)).rstrip()
    return "\n".join([fmt(cells[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in cells[1:]])


def ms(s):
    """Seconds as milliseconds with 3 significant digits (whole numbers from 100 ms up)."""
    return f"{s * 1e3:#.3g}" if s < 0.1 else f"{s * 1e3:.0f}"


def gf(value):
    return "-" if value is None else f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def verdict(part):
    if "meets_target" not in part:
        return ""
    return "ok" if part["meets_target"] else "BELOW TARGET"


def layer_table(layers):
    rows = [[r["name"] + ("" if r["input_grad"] else " (no dx)" if r["backward"] else " (no bwd)"),
             "x".join(map(str, r["output_shape"][1:])),
             f"{r['fwd_macs'] / 1e6:.0f}" if r["fwd_macs"] else "", ms(r["fwd_s"]), gf(r["fwd_gflops"]),
             gf(r["gemm_gflops"].get("fwd")), ms(r["bwd_s"]), gf(r["bwd_gflops"]), gf(r["gemm_bwd_gflops"])]
            for r in layers]
    tot = lambda k: sum(r[k] for r in layers)
    rows.append(["sum of layers", "", f"{tot('fwd_macs') / 1e6:.0f}", ms(tot("fwd_s")),
                 gf(2 * tot("fwd_macs") / tot("fwd_s") / 1e9), "", ms(tot("bwd_s")),
                 gf(2 * tot("bwd_macs") / tot("bwd_s") / 1e9), ""])
    return table(["layer", "output", "fwd MMAC", "fwd ms", "GFLOP/s", "GEMM", "bwd ms", "GFLOP/s", "GEMM"], rows)


def report(res):
    m, g = res["machine"], res["gemm"]
    blas = (m["blas"] or {}).get("name", "?") + " " + (m["blas"] or {}).get("version", "")
    out = [f"{m['platform']} | {m['cpu_count']} CPUs | numpy {m['numpy']} | BLAS {blas.strip()} | "
           f"commit {m['git_commit']}{' (dirty)' if m['git_dirty'] else ''} | mode {res['mode']}",
           f"kernel: {kernel_line(m)}", ""]
    if (m["cpu_busy_before"] or 0) > 0.1:
        out += [f"note: the CPUs were {m['cpu_busy_before']:.0%} busy with other work just before the run", ""]
    head = [[f"GEMM float32 {g['n']}^3 (run start)", f"{g['gflops']:.0f} GFLOP/s", f"best of {g['repeats']} "
             f"(median {g['median_gflops']:.0f})", "", ""]]
    for name, r in res["networks"].items():
        tr, inf = r["training"], r["inference"]
        head += [[f"{name}: GEMM ceiling", f"{ceiling(res, r):.0f} GFLOP/s", "median of those timed with its rounds",
                  "", ""],
                 [f"{name}: training step, batch {BATCH}", f"{ms(tr['median_s'])} ms",
                  f"{tr['images_per_s']:.0f} img/s, {tr['gflops']:.0f} GFLOP/s = {tr['fraction_of_gemm']:.1%} of GEMM "
                  f"(p10-p90 {ms(tr['p10_s'])}-{ms(tr['p90_s'])} ms){bound(tr)}",
                  f">= {tr['target']:.0%}" if "target" in tr else "", verdict(tr)],
                 [f"{name}: inference", f"{inf['images_per_s']:.0f} img/s",
                  f"{inf['gflops']:.0f} GFLOP/s = {inf['fraction_of_gemm']:.1%} of GEMM{bound(inf)}",
                  f">= {inf['target']:.0%}" if "target" in inf else "", verdict(inf)]]
        if r["epoch"]:
            e = r["epoch"]
            head += [[f"{name}: epoch of {e['images']:,} images", f"{e['seconds']:.1f} s",
                      f"median step x steps {e['steady_estimate_s']:.1f} s; peak memory {e['peak_rss_mb']:.0f} MB",
                      ", ".join(f"{k} <= {v:g}" for k, v in e["targets"].items()), verdict(e)]]
    out += [table(["measurement", "value", "detail", "target", "status"], head, "lrlrl"), ""]
    for name, r in res["networks"].items():
        tr = r["training"]
        out += [f"{name}: {r['description']}; per layer, vectorized, batch {BATCH} (medians; GFLOP/s = "
                f"2 x MAC / time; GEMM = the rate of a float32 GEMM of the layer's own shape)",
                layer_table(r["layers"]),
                f"sum of layer times {ms(sum(x['fwd_s'] + x['bwd_s'] for x in r['layers']))} ms; measured training "
                f"step {ms(tr['median_s'])} ms (adds the loss, the optimiser and Python overhead)", ""]
        if r.get("loop_vs_vectorized"):
            rows = [[x["name"], ms(x["loop_fwd_s"]), ms(x["loop_bwd_s"]), ms(x["vec_fwd_s"]), ms(x["vec_bwd_s"]),
                     f"{x['speedup_fwd']:.0f}x", f"{x['speedup_bwd']:.0f}x",
                     "ok" if min(x["speedup_fwd"], x["speedup_bwd"]) >= LOOP_SPEEDUP_TARGET else "BELOW TARGET"]
                    for x in r["loop_vs_vectorized"]]
            nb = r["loop_vs_vectorized"][0]["loop_batch"] if rows else "?"
            out += [f"{name}: loop vs vectorized, ms per batch of {BATCH} (loops timed on {nb} example(s) and "
                    f"scaled; target >= {LOOP_SPEEDUP_TARGET:.0f}x)",
                    table(["layer", "loop fwd", "loop bwd", "vec fwd", "vec bwd", "speedup fwd", "bwd", "status"],
                          rows, "lrrrrrrl"), ""]
    return "\n".join(out)


def target_and_bound(part):
    """" (30%, 51%)": a fraction's target ("–": none) and products-alone estimate, the order
    of the table's header; " (30%)" for files without the estimate, "" with neither."""
    target = f"{part['target']:.0%}" if "target" in part else "–"
    if "products_bound_fraction" in part:
        return f" ({target}, {part['products_bound_fraction']:.0%})"
    return f" ({target})" if "target" in part else ""


def bound(part):
    """", products alone X%": the fraction of the GEMM rate a step or inference would reach
    if it took only its matrix products, each at a plain GEMM's rate for its shape
    (``bench_shape_rates``: rounds of the ceiling and the shapes, the median of their ratios);
    an estimate, not a hard limit. Not in results files before 2026-11-26."""
    return f", products alone {part['products_bound_fraction']:.0%}" if "products_bound_fraction" in part else ""


def ceiling(res, r):
    """A network's GEMM GFLOP/s: the median of those timed with its rounds (files before
    09:20 on 2026-11-26: the one timed just before it; before 2026-11-26: one for the run)."""
    return r.get("gemm", res["gemm"])["gflops"]


SPEED_HEADER = ["network", "GEMM ceiling", "training step, batch 64", "% of GEMM (target, products alone)",
                "inference", "% of GEMM (target, products alone)", "epoch"]


def speed_summary(res):
    """(sentence, rows) of the README's speed table from a results file: the sentence naming
    the run, its kernel and its ceilings, and one row of cells (``SPEED_HEADER``) per network."""
    m = res["machine"]
    rates = [ceiling(res, r) for r in res["networks"].values()]
    rounds = all("gflops_each" in r.get("gemm", {}) for r in res["networks"].values())
    beside = all("gemm" in r for r in res["networks"].values())
    span = f"({min(rates):.0f}–{max(rates):.0f} GFLOP/s in this run: the shared machine's speed moves)"
    n = res["gemm"].get("n", GEMM_N)                    # the ceiling's size, as the file records it
    sentence = (f"Measured {res['timestamp'][:10]} ({res['mode']} run), kernel: {kernel_line(m)}; " +
                (f"every fraction is a median over rounds, each against a float32 {n}³ GEMM timed at its start; the "
                 f"ceiling column is the median of a network's GEMMs {span}." if rounds else
                 f"every fraction refers to a float32 {n}³ GEMM timed just before that network {span}." if beside
                 else f"float32 {n}³ GEMM {rates[0]:.0f} GFLOP/s at the start of the run (the ceiling "
                 "every fraction refers to)."))
    rows = []
    for name, r in res["networks"].items():
        tr, inf, e = r["training"], r["inference"], r["epoch"]
        batch = f" (batch {e['batch']})" if e and e.get("batch", BATCH) != BATCH else ""
        epoch = (f"{e['images']:,} images{batch}: {e['seconds']:.1f} s, peak {e['peak_rss_mb']:,.0f} MB" if e else "")
        rows.append([name, f"{ceiling(res, r):.0f} GFLOP/s",
                     f"{ms(tr['median_s'])} ms = {tr['images_per_s']:,.0f} img/s = {tr['gflops']:.0f} GFLOP/s",
                     f"**{tr['fraction_of_gemm']:.1%}**{target_and_bound(tr)}",
                     f"{inf['images_per_s']:,.0f} img/s = {inf['gflops']:.0f} GFLOP/s",
                     f"**{inf['fraction_of_gemm']:.1%}**{target_and_bound(inf)}", epoch])
    return sentence, rows


def markdown(res):
    """The README's speed table, from a results file: ``speed_summary`` as Markdown."""
    sentence, rows = speed_summary(res)
    return "\n".join([sentence, "", "| " + " | ".join(SPEED_HEADER) + " |", "|" + "---|" * len(SPEED_HEADER)]
                     + ["| " + " | ".join(row) + " |" for row in rows])


def write_json(path, data, F):
    """The results as JSON, written atomically (``cnn_files.atomic_write``)."""
    text = json.dumps(data, indent=1, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
    with F.atomic_write(path) as f:
        f.write((text + "\n").encode())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, no epochs (smoke test, < 1 min)")
    parser.add_argument("--no-epochs", action="store_true", help="full repeats but no epoch subprocesses")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results.json"), help="output JSON path")
    parser.add_argument("--networks", default=",".join(NETWORKS), help="comma-separated names from NETWORKS")
    parser.add_argument("--markdown", action="store_true", help="print the README table from --json and exit")
    parser.add_argument("--code", default=str(ROOT), help="directory to import the cnn_* modules from "
                        "(e.g. a copy of an older version, for a before/after comparison)")
    parser.add_argument("--epoch-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.json).read_text())))
        return 0
    if args.epoch_child:
        return epoch_child(args.epoch_child, args.code)
    names = [n for n in args.networks.split(",") if n]
    unknown = [n for n in names if n not in NETWORKS]
    if unknown:
        parser.error(f"unknown network(s) {unknown}; choose from {list(NETWORKS)}")
    code = load_code(args.code)
    F = importlib.import_module("cnn_files")
    cfg, began = dict(QUICK if args.quick else FULL), time.perf_counter()
    cfg["epochs"] = cfg["epochs"] and not args.no_epochs
    res = {"mode": "quick" if args.quick else "full", "timestamp": datetime.now(timezone.utc).isoformat(),
           "machine": machine_info(args.code), "settings": dict(cfg, batch=BATCH, step_optimizer=STEP_OPTIMIZER)}
    if res["machine"]["blas_env"].get("OPENBLAS_CORETYPE"):
        log(f"note: OPENBLAS_CORETYPE={res['machine']['blas_env']['OPENBLAS_CORETYPE']} is set: the figures are "
            "for that kernel (the recorded run unsets it: env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE make bench)")
    log("GEMM ...")
    res["gemm"] = bench_gemm(GEMM_N, cfg["gemm_repeats"])          # the run's first ceiling (each network has its own)
    res["networks"] = {name: bench_network(name, NETWORKS[name], cfg, code) for name in names}
    if cfg["epochs"]:
        for name in names:
            if NETWORKS[name].epoch:
                log(f"{name}: one training epoch of {NETWORKS[name].epoch.images:,} images in a subprocess ...")
                res["networks"][name]["epoch"] = bench_epoch(name, args.code)
    res["gemm_after"] = bench_gemm(GEMM_N, cfg["gemm_repeats"])          # did the machine change meanwhile?
    res["machine"]["cpu_busy_after"] = cpu_busy()
    res["bench_seconds"] = time.perf_counter() - began
    write_json(args.json, res, F)
    print(report(res))
    print(f"\n{res['mode']} run took {res['bench_seconds']:.0f} s; results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
