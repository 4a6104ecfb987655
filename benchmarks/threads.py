"""Why training runs on one Python thread: a batch split across the cores, timed against OpenBLAS's threads.

NumPy runs its elementwise work (im2col copies, pooling, batch norm, ReLU) on one core;
OpenBLAS splits each matrix product across its threads. The other way to use every core is
data parallelism: cut each batch into one part per core and run each part through its own
replica of the network (shallow copies of the layers, sharing the weights) in a Python
thread, with OpenBLAS on one thread meanwhile (its thread count is one setting for the whole
process, so it is set to 1 around each split step and restored after). This script times a
training step both ways, interleaved, for the benchmark's networks at batch 64 and 128.

Timing only, and a little kind to the split step: here each part normalises with its own
batch statistics (the replicas' running statistics and dropout generators are their own and
thrown away). The exact version (batch norm summing its statistics across the parts, two
barriers per layer and pass; every output, gradient and running statistic equal to one
thread's to 1e-14 in float64) was built and measured against the unsplit step on 2026-11-26
(commit 306cbf1): 1.04-1.22 times as fast for the CIFAR-10 network (batch 64-128), 0.69-0.80
for the MNIST and row-sequence networks. It was reverted (7993b94): a gain for the largest
network only, none in the report build (two notebooks side by side already use both cores),
for some 230 lines of threads and barriers and a hook in batch norm's maths.

    python benchmarks/threads.py            # writes benchmarks/threads.json
    python benchmarks/threads.py --quick    # one small network, few steps (a smoke test)

The two threads barely overlap for the small networks (Python's global interpreter lock, and
per-layer work too short to split); threads.json has each network's times. It needs NumPy's
own OpenBLAS (a pip wheel) with two or more threads: the comparison is against its threads.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import cnn_files as F         # noqa: E402  (the project's modules live one folder up)
import cnn_layers as L        # noqa: E402
import cnn_model as M         # noqa: E402
import cnn_train as T         # noqa: E402
from bench import NETWORKS, STEP_OPTIMIZER, build, openblas_libraries, synthetic, training_step  # noqa: E402


def blas_threads():
    """(get, set) of NumPy's OpenBLAS thread count (ctypes), or None."""
    for _, lib in openblas_libraries():
        for prefix, suffix in (("scipy_openblas_", "64_"), ("openblas_", "64_"), ("openblas_", "")):
            get, put = (getattr(lib, f"{prefix}{verb}_num_threads{suffix}", None) for verb in ("get", "set"))
            if get is not None and put is not None:
                get.restype, put.argtypes = ctypes.c_int, [ctypes.c_int]
                return get, put
    return None


def split_step(model, parts, pool, blas):
    """The same step with the batch cut into ``parts`` parts, each through a replica in a thread;
    the replicas' gradients are summed into the model's before the update."""
    replicas = [model] + [copy.copy(model) for _ in range(parts - 1)]
    for k, replica in enumerate(replicas[1:], start=1):
        replica.layers = [copy.copy(layer) for layer in model.layers]
        for layer in replica.layers:
            layer._work, layer._cache, layer.grads = None, None, {}
            layer.buffers = {name: a.copy() for name, a in layer.buffers.items()}
            if isinstance(layer, L.Dropout):
                layer.rng = np.random.default_rng(k)                            # not the model's generator
    losses, optimizer = [L.SoftmaxCrossEntropy() for _ in range(parts)], eval(STEP_OPTIMIZER, {"T": T})

    def part(k, x, y, share):
        losses[k].forward(replicas[k].forward(x, training=True), y)
        replicas[k].backward(losses[k].backward() * share, input_grad=False)     # the part's mean, weighted

    def step(x, y):
        bounds = np.linspace(0, len(x), parts + 1).astype(int)
        before = blas[0]() if blas else None
        if blas:
            blas[1](1)
        try:
            for future in [pool.submit(part, k, x[bounds[k]:bounds[k + 1]], y[bounds[k]:bounds[k + 1]],
                                       (bounds[k + 1] - bounds[k]) / len(x)) for k in range(parts)]:
                future.result()
        finally:
            if blas:
                blas[1](before)
        for i, layer in enumerate(model.layers):
            if not (layer.trainable and layer.params):
                continue
            if not all(r.layers[i].grads.keys() == layer.grads.keys() for r in replicas[1:]):
                raise RuntimeError(f"threads.py: layer {i} has no gradient in some part")
            layer.grads = {name: g + sum(r.layers[i].grads[name] for r in replicas[1:])
                           for name, g in layer.grads.items()}
        optimizer.step(model)
    return step


def compare(name, batch, steps, parts, pool, blas):
    """Median seconds of the unsplit and the split step, interleaved, after 3 of each."""
    x, y = synthetic(8 * batch, NETWORKS[name].input_shape, seed=1)
    whole, split = training_step(build(NETWORKS[name], M, L), L, T), split_step(build(NETWORKS[name], M, L), parts, pool, blas)
    times = {"unsplit": [], "split": []}
    for s in range(steps + 3):
        i = (s % 8) * batch
        for kind, step in (("unsplit", whole), ("split", split)):
            start = time.perf_counter()
            step(x[i:i + batch], y[i:i + batch])
            if s >= 3:
                times[kind].append(time.perf_counter() - start)
    unsplit, split = statistics.median(times["unsplit"]) * 1e3, statistics.median(times["split"]) * 1e3
    return {"network": name, "batch": batch, "parts": parts, "steps": steps, "unsplit_ms": unsplit,
            "split_ms": split, "speedup": unsplit / split}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small network, few steps")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "threads.json"))
    args = parser.parse_args(argv)
    blas = blas_threads()
    if blas is None:
        sys.exit("threads.py: NumPy's bundled OpenBLAS was not found (another BLAS?); this comparison sets its "
                 "thread count and needs it")
    threads = blas[0]()
    if threads < 2 and not args.quick:
        sys.exit(f"threads.py: OpenBLAS runs {threads} thread (OPENBLAS_NUM_THREADS=1?); the comparison is "
                 "against its own threads: run it without that setting on a machine with 2+ cores")
    parts = max(2, threads)
    cases = [("mnist", 16)] if args.quick else [(n, b) for n in ("mnist", "mnist_v2", "rows", "cifar_net")
                                                 for b in (64, 128)]
    steps = 2 if args.quick else 21
    rows = []
    with ThreadPoolExecutor(parts) as pool:
        for name, batch in cases:
            r = compare(name, batch, steps, parts, pool, blas)
            rows.append(r)
            print(f"{name}, batch {batch}: unsplit (OpenBLAS {threads} threads) {r['unsplit_ms']:.1f} ms, "
                  f"split in {parts} parts {r['split_ms']:.1f} ms: {r['speedup']:.2f}x as fast", flush=True)
    result = {"timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"), "quick": args.quick,
              "openblas_threads": threads, "cpu_count": os.cpu_count(), "rows": rows}
    with F.atomic_write(args.json) as f:
        f.write((json.dumps(result, indent=1) + "\n").encode())


if __name__ == "__main__":
    main()
