"""Benchmark of the GRU in ``cnn_rnn.py`` at the CIFAR-10 rows shape, against GEMMs of its shape.

    python benchmarks/bench_rnn.py            # full run (under a minute), writes benchmarks/results_rnn.json
    python benchmarks/bench_rnn.py --quick    # smoke run (seconds)

One run measures, with medians over repeats so machine noise cancels:
  * the GRU layer's forward (training=True) and backward (input gradient included) time at
    batch 64, T = 32 steps of D = 96 values (CIFAR-10 read row by row), hidden size H,
  * its GFLOP/s, counted as 2 * multiply-adds of its matrix products (``cnn_rnn.gru_macs``),
  * the GFLOP/s of a float32 GEMM with the same multiply-adds in ONE product,
    (N*T, D+H) @ (D+H, 3H): the ceiling for this work on this machine, and of the products
    the GRU really makes (the one input projection and the T small recurrent products), so
    the gap splits into "small products" and "elementwise work and Python overhead",
  * the loop version (on 2 examples, scaled to 64) and the speed-up of the vectorized one,
  * a whole training step (forward, loss, backward, clip_norm=1.0, Adam) of the row-GRU recipe
    networks ``cnn_model.mnist_rows_gru`` / ``cifar_rows_gru`` at batch 64, and the epoch time it
    implies (median step x steps per epoch: robust to load spikes from other work).
Written to be merged into benchmarks/bench.py: ``bench_gru(cfg)`` returns a dict, ``report_gru`` a table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import cnn_files as F  # noqa: E402
import cnn_layers as L  # noqa: E402
import cnn_model as M  # noqa: E402
import cnn_rnn as S  # noqa: E402
import cnn_train as T  # noqa: E402
from bench import log, timed  # noqa: E402  (benchmarks/bench.py: one copy of the timing helpers)

SHAPE = dict(N=64, T=32, D=96, H=128)          # batch 64 of CIFAR-10 rows, the recipe's hidden size
FULL = dict(repeats=15, gemm_repeats=5, loop_batch=2, steps=40)
QUICK = dict(repeats=3, gemm_repeats=3, loop_batch=1, steps=4)
RECIPES = {"mnist_rows_gru": ((1, 28, 28), 55_000), "cifar_rows_gru": ((3, 32, 32), 45_000)}   # input, train size


def median_time(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn) for _ in range(repeats))


def cpu_busy(seconds=0.5):
    """Fraction of all CPUs busy with other work while we sleep (Linux /proc/stat), else None."""
    def snapshot():
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
        return sum(ticks), ticks[3] + ticks[4]
    try:
        (t0, i0), _, (t1, i1) = snapshot(), time.sleep(seconds), snapshot()
    except (OSError, ValueError):
        return None
    return 1 - (i1 - i0) / max(t1 - t0, 1)


def bench_gru(cfg, N=SHAPE["N"], T=SHAPE["T"], D=SHAPE["D"], H=SHAPE["H"]):
    """Times (seconds per batch) and rates of one GRU direction and of the GEMMs of its shape.

    Measured in interleaved rounds (forward, backward, then each GEMM a few times), so
    the GRU and its GEMMs see the same machine state; medians over the rounds.
    """
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, T, D), dtype=np.float32)
    layer = S.GRU(D, H, return_sequences=True, seed=0)
    dout = rng.standard_normal((N, T, H), dtype=np.float32)
    gemms = {                                         # name: (m, k, n, how many the GRU makes per pass)
        "same_macs_one_product": (N * T, D + H, 3 * H, 1),
        "input_projection": (N * T, D, 3 * H, 1),
        "recurrent_step": (N, H, 3 * H, T),
        "recurrent_step_backward": (N, 3 * H, H, T),
    }
    operands = {name: (rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32),
                       np.empty((m, n), np.float32)) for name, (m, k, n, _) in gemms.items()}
    layer.forward(x, training=True)                  # warm-up
    layer.backward(dout)
    times = {name: [] for name in ("fwd", "bwd", *gemms)}
    for _ in range(cfg["repeats"]):
        times["fwd"].append(timed(lambda: layer.forward(x, training=True)))
        times["bwd"].append(timed(lambda: layer.backward(dout)))
        for name, (a, b, c) in operands.items():
            np.matmul(a, b, out=c)
            times[name].append(statistics.median(timed(lambda: np.matmul(a, b, out=c))
                                                 for _ in range(cfg["gemm_repeats"])))
    med = {name: statistics.median(t) for name, t in times.items()}
    fwd, bwd = med["fwd"], med["bwd"]
    fwd_macs, bwd_macs = S.gru_macs(N, T, D, H)
    gemm = {name: {"shape": [m, k, n], "count": count, "median_s": med[name],
                   "gflops": 2 * m * k * n / med[name] / 1e9} for name, (m, k, n, count) in gemms.items()}
    ceiling = gemm["same_macs_one_product"]["gflops"]
    # what the forward's products alone cost when timed on their own: one projection + T steps
    products_s = gemm["input_projection"]["median_s"] + T * gemm["recurrent_step"]["median_s"]
    nb = cfg["loop_batch"]
    loop = S.GRU(D, H, return_sequences=True, impl="loop", seed=0)
    loop_fwd = median_time(lambda: loop.forward(x[:nb], training=True), 1, warmup=0) * N / nb
    loop_bwd = median_time(lambda: loop.backward(dout[:nb]), 1, warmup=0) * N / nb
    return {"shape": dict(N=N, T=T, D=D, H=H), "rounds": cfg["repeats"], "fwd_macs": fwd_macs, "bwd_macs": bwd_macs,
            "fwd_s": fwd, "bwd_s": bwd, "fwd_best_s": min(times["fwd"]), "bwd_best_s": min(times["bwd"]),
            "ceiling_best_gflops": 2 * fwd_macs / min(times["same_macs_one_product"]) / 1e9, "fwd_gflops": 2 * fwd_macs / fwd / 1e9,
            "bwd_gflops": 2 * bwd_macs / bwd / 1e9, "step_gflops": 2 * (fwd_macs + bwd_macs) / (fwd + bwd) / 1e9,
            "gemm": gemm, "ceiling_gflops": ceiling,
            "fwd_fraction_of_gemm": 2 * fwd_macs / fwd / 1e9 / ceiling,
            "bwd_fraction_of_gemm": 2 * bwd_macs / bwd / 1e9 / ceiling,
            "fwd_products_alone_s": products_s,
            "loop_batch": nb, "loop_fwd_s": loop_fwd, "loop_bwd_s": loop_bwd,
            "speedup_fwd": loop_fwd / fwd, "speedup_bwd": loop_bwd / bwd}


def bench_recipe_steps(cfg, batch=64):
    """Median time of one training step of each recipe network, as ``cnn_train.fit`` does it."""
    rng, out = np.random.default_rng(1), {}
    for name, (shape, train_size) in RECIPES.items():
        model = getattr(M, name)()
        x = rng.standard_normal((batch,) + shape, dtype=np.float32)
        y = rng.integers(0, 10, batch)
        loss_fn, optimizer = L.SoftmaxCrossEntropy(), T.Adam(3e-3)

        def step():
            loss_fn.forward(model.forward(x, training=True), y)
            model.backward(loss_fn.backward(), input_grad=False)
            T.clip_gradients(model, 1.0)
            optimizer.step(model)
        s = median_time(step, cfg["steps"], warmup=2)
        steps = -(-train_size // batch)
        out[name] = {"batch": batch, "median_step_s": s, "train_images": train_size,
                     "epoch_estimate_s": s * steps, "params": model.num_params()}
    return out


def ms(s):
    return f"{s * 1e3:#.3g}" if s < 0.1 else f"{s * 1e3:.0f}"


def report_gru(g):
    s = g["shape"]
    ceiling = g["ceiling_gflops"]
    lines = [f"GRU, one direction, batch {s['N']}, T={s['T']} steps of D={s['D']}, H={s['H']} "
             f"(CIFAR-10 rows); MMAC = 1e6 multiply-adds of the matrix products; medians",
             f"  {'':<34}{'MMAC':>8}{'ms':>9}{'GFLOP/s':>9}{'of GEMM':>9}",
             f"  {'forward (training=True)':<34}{g['fwd_macs'] / 1e6:>8.1f}{ms(g['fwd_s']):>9}"
             f"{g['fwd_gflops']:>9.1f}{g['fwd_fraction_of_gemm']:>9.1%}",
             f"  {'backward through time (with dx)':<34}{g['bwd_macs'] / 1e6:>8.1f}{ms(g['bwd_s']):>9}"
             f"{g['bwd_gflops']:>9.1f}{g['bwd_fraction_of_gemm']:>9.1%}",
             f"  {'forward + backward':<34}{(g['fwd_macs'] + g['bwd_macs']) / 1e6:>8.1f}"
             f"{ms(g['fwd_s'] + g['bwd_s']):>9}{g['step_gflops']:>9.1f}{g['step_gflops'] / ceiling:>9.1%}",
             f"  {'(fastest round: fwd':<34}{'':>8}{ms(g['fwd_best_s']):>9}"
             f"{2 * g['fwd_macs'] / g['fwd_best_s'] / 1e9:>9.1f}   bwd {ms(g['bwd_best_s'])} ms "
             f"{2 * g['bwd_macs'] / g['bwd_best_s'] / 1e9:.1f} GFLOP/s; GEMM {g['ceiling_best_gflops']:.1f})",
             "", "  GEMMs measured in the same run (float32, median):"]
    for name, e in g["gemm"].items():
        m, k, n = e["shape"]
        lines.append(f"  {name:<26} ({m}x{k}) @ ({k}x{n}) x{e['count']:<3}{ms(e['median_s']):>8} ms "
                     f"{e['gflops']:>7.1f} GFLOP/s")
    lines += [f"  the forward's own products timed alone: {ms(g['fwd_products_alone_s'])} ms of its "
              f"{ms(g['fwd_s'])} ms (the rest: gate arithmetic and Python, per step)",
              f"  loop version (on {g['loop_batch']} example(s), x{s['N'] // g['loop_batch']}): forward "
              f"{ms(g['loop_fwd_s'])} ms, backward {ms(g['loop_bwd_s'])} ms; vectorized is "
              f"{g['speedup_fwd']:.0f}x / {g['speedup_bwd']:.0f}x faster"]
    return "\n".join(lines)


def report_recipes(recipes):
    lines = ["Training step of the recipe networks (forward, loss, backward, clip_norm, Adam), median:"]
    for name, r in recipes.items():
        lines.append(f"  {name:<16} {r['params']:>8,} parameters  step {ms(r['median_step_s'])} ms at batch "
                     f"{r['batch']}  -> {r['epoch_estimate_s']:.0f} s per epoch of {r['train_images']:,} images")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke test)")
    parser.add_argument("--hidden", type=int, default=SHAPE["H"], help="hidden size H (default %(default)s)")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results_rnn.json"), help="output JSON path")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    busy, began = cpu_busy(), time.perf_counter()
    log("GRU ...")
    res = {"mode": "quick" if args.quick else "full", "timestamp": datetime.now(timezone.utc).isoformat(),
           "cpu_count": os.cpu_count(), "numpy": np.__version__, "cpu_busy_before": busy, "settings": cfg,
           "gru": bench_gru(cfg, H=args.hidden)}
    log("recipe training steps ...")
    res["recipes"] = bench_recipe_steps(cfg)
    res["bench_seconds"] = time.perf_counter() - began
    text = json.dumps(res, indent=2, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
    with F.atomic_write(args.json) as f:
        f.write((text + "\n").encode())
    print(report_gru(res["gru"]))
    print()
    print(report_recipes(res["recipes"]))
    if (busy or 0) > 0.1:
        print(f"note: the CPUs were {busy:.0%} busy with other work just before the run")
    print(f"\n{res['mode']} run took {res['bench_seconds']:.0f} s; results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
