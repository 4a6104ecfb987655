"""Benchmark of the NumPy CNN in ``cnn_core.py``, all figures from ONE run so machine noise cancels.

    python benchmarks/bench.py            # full run (a few minutes), writes benchmarks/results.json
    python benchmarks/bench.py --quick    # smoke run for tests/CI (< 1 min), no epoch/memory subprocess

Measures: the float32 GEMM rate (reference ceiling), training and inference speed of the default
MNIST network on synthetic data, multiply-adds per layer and the achieved GFLOP/s, vectorized vs
loop time per layer, and the peak memory and duration of a 60,000-image training epoch.
Medians over repeats unless said otherwise. See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import cnn_core as C  # noqa: E402
import cnn_layers as L  # noqa: E402
import cnn_model as M  # noqa: E402
import cnn_train as T  # noqa: E402
import cnn_files as F  # noqa: E402

BATCH = 64
IMAGE_SHAPE = (1, 28, 28)                 # one MNIST image, NCHW without N
EPOCH_IMAGES = 60_000
TARGETS = {"training_fraction_of_gemm": 0.25, "inference_fraction_of_gemm": 0.30,
           "loop_speedup_conv_pool": 100.0, "epoch_peak_rss_mb": 1000.0}
FULL = dict(gemm_repeats=7, warmup=10, steps=100, infer_images=10_000, infer_repeats=3,
            layer_repeats=7, loop_batch=2, loop_min_s=0.2)
QUICK = dict(gemm_repeats=3, warmup=3, steps=20, infer_images=2_000, infer_repeats=1,
             layer_repeats=3, loop_batch=1, loop_min_s=0.0)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def synthetic(n, num_classes, seed):
    """Random normal float32 images (generated directly in float32: no float64 copy) and labels."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n,) + IMAGE_SHAPE, dtype=np.float32), rng.integers(0, num_classes, n)


def num_classes(model):
    return model.forward(np.zeros((1,) + IMAGE_SHAPE, np.float32), training=False).shape[1]


# ----------------------------------------------------------------------------- measurements

def bench_gemm(n, repeats):
    """Best-of-``repeats`` float32 n x n @ n x n after one warm-up: the BLAS ceiling."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    c = np.empty((n, n), np.float32)
    np.matmul(a, b, out=c)
    times = [timed(lambda: np.matmul(a, b, out=c)) for _ in range(repeats)]
    return {"n": n, "repeats": repeats, "best_s": min(times), "median_s": statistics.median(times),
            "gflops": 2 * n ** 3 / min(times) / 1e9}


def bench_training(model, warmup, steps):
    """Per-step times of forward(training) + loss + backward + Adam, 8 synthetic batches cycled."""
    xs, ys = synthetic(8 * BATCH, num_classes(model), seed=1)
    loss_fn, opt, times = L.SoftmaxCrossEntropy(), T.Adam(), []
    for s in range(warmup + steps):
        i = (s % 8) * BATCH
        xb, yb = xs[i:i + BATCH], ys[i:i + BATCH]
        start = time.perf_counter()
        loss_fn.forward(model.forward(xb, training=True), yb)
        model.backward(loss_fn.backward(), input_grad=False)      # as fit() does
        opt.step(model)
        if s >= warmup:
            times.append(time.perf_counter() - start)
    return times


def bench_inference(model, n_images, repeats):
    """Median time of ``model.predict_proba`` (its default batch size) on n_images."""
    x, _ = synthetic(n_images, 10, seed=2)
    model.predict_proba(x[:1000])                                                  # warm-up
    return statistics.median(timed(lambda: model.predict_proba(x)) for _ in range(repeats))


def trace(model, x, y):
    """Input and output-gradient of every layer in one training step of the real network."""
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


def layer_macs(layer, out_shape):
    """(forward, backward) multiply-adds. Conv: N*OH*OW*F*C*kh*kw per product; dense: N*D*M per
    product; backward = dW + dX products (a training step skips the first layer's dX: see main)."""
    if isinstance(layer, L.Conv2D):
        N, _, OH, OW = out_shape
        macs = N * OH * OW * layer.params["W"].size          # W: (F, C, kh, kw)
    elif isinstance(layer, L.Dense):
        macs = out_shape[0] * layer.params["W"].size         # W: (D, M)
    else:
        return 0, 0
    return macs, 2 * macs


def time_layer(layer, x, dout, repeats, min_s=0.0, warmup=True, max_repeats=5):
    """Median forward(training=True) and backward times; repeats at least ``repeats`` times and
    until ``min_s`` seconds have been spent (at most ``max_repeats`` for the slow loops)."""
    if warmup:
        layer.forward(x, training=True)
        layer.backward(dout)
    fwd, bwd = [], []
    while len(fwd) < repeats or (sum(fwd) + sum(bwd) < min_s and len(fwd) < max_repeats):
        fwd.append(timed(lambda: layer.forward(x, training=True)))
        bwd.append(timed(lambda: layer.backward(dout)))
    return statistics.median(fwd), statistics.median(bwd)


def bench_layers(model, cfg):
    """Per-layer MACs and times, vectorized at batch 64 and loop on a small batch scaled to 64."""
    x, y = synthetic(BATCH, num_classes(model), seed=4)
    model.set_impl("vectorized")
    inputs, douts = trace(model, x, y)
    rows, nb = [], cfg["loop_batch"]
    for i, layer in enumerate(model.layers):
        fwd_macs, bwd_macs = layer_macs(layer, douts[i].shape)
        vf, vb = time_layer(layer, inputs[i], douts[i], cfg["layer_repeats"])
        rows.append({"index": i, "name": f"{i} {layer.label()}", "type": type(layer).__name__,
                     "input_shape": list(inputs[i].shape), "output_shape": list(douts[i].shape),
                     "fwd_macs": fwd_macs, "bwd_macs": bwd_macs, "vec_fwd_s": vf, "vec_bwd_s": vb,
                     "has_loop": hasattr(layer, "impl")})
    model.set_impl("loop")
    try:
        for row, layer in zip(rows, model.layers):
            if not row["has_loop"]:
                continue
            log(f"  loop {row['name']} on {nb} example(s)")
            i = row["index"]
            lf, lb = time_layer(layer, inputs[i][:nb], douts[i][:nb], 1, cfg["loop_min_s"], warmup=False)
            scale = BATCH / nb                                      # the loops are linear in N
            row.update(loop_batch=nb, loop_fwd_s=lf * scale, loop_bwd_s=lb * scale,
                       speedup_fwd=lf * scale / row["vec_fwd_s"], speedup_bwd=lb * scale / row["vec_bwd_s"],
                       speedup_total=(lf + lb) * scale / (row["vec_fwd_s"] + row["vec_bwd_s"]))
    finally:
        model.set_impl("vectorized")
    return rows


def epoch_child():
    """Run in a subprocess: 60,000 synthetic images + one ``cnn_train.fit`` epoch; prints JSON."""
    model = M.mnist_cnn(seed=0)
    x, y = synthetic(EPOCH_IMAGES, num_classes(model), seed=3)
    stamps = []

    def stamp(xb, rng):                    # fit calls augment once per batch: a free per-step clock
        stamps.append(time.perf_counter())
        return xb
    history = T.fit(model, x, y, T.Adam(), epochs=1, batch_size=BATCH, augment=stamp, progress=False, log=None)
    steps = np.diff(stamps + [time.perf_counter()])
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss          # KiB on Linux, bytes on macOS
    rss_bytes = maxrss if sys.platform == "darwin" else maxrss * 1024
    print(json.dumps({"images": EPOCH_IMAGES, "batch": BATCH, "data_mb": x.nbytes / 1e6,
                      "seconds": history.seconds[0], "steps": len(steps), "median_step_s": float(np.median(steps)),
                      "steady_estimate_s": float(np.median(steps)) * len(steps), "peak_rss_mb": rss_bytes / 1e6}))


def bench_epoch():
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--epoch-child"],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"epoch subprocess failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- reporting

def cpu_busy(seconds=0.5):
    """Fraction of all CPUs busy (or stolen by the hypervisor) while we sleep: other work on the
    machine that would add noise. Linux only (/proc/stat), else None."""
    def snapshot():
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
        return sum(ticks), ticks[3] + ticks[4]                            # total, idle + iowait
    try:
        (t0, i0), _, (t1, i1) = snapshot(), time.sleep(seconds), snapshot()
    except (OSError, ValueError):
        return None
    return 1 - (i1 - i0) / max(t1 - t0, 1)


def machine_info():
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "numpy": np.__version__, "blas": None}
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
    info["cnn_core_sha256"] = hashlib.sha256(Path(C.__file__).read_bytes()).hexdigest()[:16]  # it may be uncommitted
    status = git("status", "--porcelain", "--untracked-files=no")
    info["git_dirty"] = None if status is None else bool(status)
    return info


def table(headers, rows, align=None):
    """Plain-text table; ``align`` has one 'l' or 'r' per column (default: first left, rest right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    cells = [list(map(str, headers))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[k]) for r in cells) for k in range(len(headers))]
    fmt = lambda r: "  ".join(c.ljust(w) if a == "l" else c.rjust(w)
                              for c, w, a in zip(r, widths, align)).rstrip()
    lines = [fmt(cells[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in cells[1:]]
    return "\n".join(lines)


def ms(s):
    """Seconds as milliseconds with 3 significant digits (whole numbers from 100 ms up)."""
    return f"{s * 1e3:#.3g}" if s < 0.1 else f"{s * 1e3:.0f}"


def verdict(ok):
    return "ok" if ok else "BELOW TARGET"


def report(res):
    m, g, tr, inf = res["machine"], res["gemm"], res["training"], res["inference"]
    blas = (m["blas"] or {}).get("name", "?") + " " + (m["blas"] or {}).get("version", "")
    out = [f"{m['platform']} | {m['cpu_count']} CPUs | numpy {m['numpy']} | BLAS {blas.strip()} | "
           f"commit {m['git_commit']}{' (dirty)' if m['git_dirty'] else ''} | mode {res['mode']}", ""]
    head = [["GEMM float32 {0}x{0}".format(g["n"]), f"{g['gflops']:.1f} GFLOP/s", f"best of {g['repeats']}", "", ""],
            [f"training, batch {BATCH}", f"{tr['images_per_s']:.0f} img/s",
             f"median step {ms(tr['median_step_s'])} ms over {tr['steps']} steps", "", ""],
            ["  achieved", f"{tr['gflops']:.1f} GFLOP/s", f"{tr['fraction_of_gemm']:.1%} of GEMM",
             f">= {TARGETS['training_fraction_of_gemm']:.0%}", verdict(tr["meets_target"])],
            [f"inference, batches of {inf['batch']}", f"{inf['images_per_s']:.0f} img/s",
             f"{inf['images']} images in {inf['seconds']:.2f} s", "", ""],
            ["  achieved", f"{inf['gflops']:.1f} GFLOP/s", f"{inf['fraction_of_gemm']:.1%} of GEMM",
             f">= {TARGETS['inference_fraction_of_gemm']:.0%}", verdict(inf["meets_target"])]]
    if res["epoch"]:
        e = res["epoch"]
        head += [[f"epoch of {e['images']:,} images", f"{e['seconds']:.1f} s",
                  f"{e['images'] / e['seconds']:.0f} img/s (cnn_train.fit, subprocess)", "", ""],
                 ["  median step x steps", f"{e['steady_estimate_s']:.1f} s",
                  f"median step {ms(e['median_step_s'])} ms x {e['steps']} (robust to load spikes)", "", ""],
                 ["  peak resident memory", f"{e['peak_rss_mb']:.0f} MB", f"data {e['data_mb']:.0f} MB",
                  f"<= {TARGETS['epoch_peak_rss_mb']:.0f} MB", verdict(e["meets_target"])]]
    out += [table(["measurement", "value", "detail", "target", "status"], head, "lrlrl"), ""]
    if (m["cpu_busy_before"] or 0) > 0.1:
        out[-1:-1] = [f"note: the CPUs were {m['cpu_busy_before']:.0%} busy with other work just before the run"]
    layer_rows = res["layers"]
    gf = lambda macs, s: f"{2 * macs / s / 1e9:.1f}" if macs else "-"
    rows = [[r["name"], "x".join(map(str, r["output_shape"][1:])), f"{r['fwd_macs'] / 1e6:.1f}",
             f"{r['bwd_macs'] / 1e6:.1f}", ms(r["vec_fwd_s"]), ms(r["vec_bwd_s"]),
             gf(r["fwd_macs"], r["vec_fwd_s"]), gf(r["bwd_macs"], r["vec_bwd_s"])] for r in layer_rows]
    tot = lambda k: sum(r[k] for r in layer_rows)
    rows.append(["sum of layers", "", f"{tot('fwd_macs') / 1e6:.1f}", f"{tot('bwd_macs') / 1e6:.1f}",
                 ms(tot("vec_fwd_s")), ms(tot("vec_bwd_s")), gf(tot("fwd_macs"), tot("vec_fwd_s")),
                 gf(tot("bwd_macs"), tot("vec_bwd_s"))])
    out += [f"Per layer, vectorized, batch {BATCH} (MMAC = 1e6 multiply-adds; GFLOP/s = 2 * MAC / time)",
            table(["layer", "output", "fwd MMAC", "bwd MMAC", "fwd ms", "bwd ms", "fwd GFLOP/s", "bwd GFLOP/s"], rows),
            f"sum of layer times {ms(tot('vec_fwd_s') + tot('vec_bwd_s'))} ms vs measured median training step "
            f"{ms(tr['median_step_s'])} ms (the step adds loss, Adam, Python overhead)", ""]
    rows = []
    for r in (r for r in layer_rows if r["has_loop"]):
        target = r["type"] in ("Conv2D", "MaxPool2D", "AvgPool2D")
        ok = min(r["speedup_fwd"], r["speedup_bwd"]) >= TARGETS["loop_speedup_conv_pool"]
        rows.append([r["name"], ms(r["loop_fwd_s"]), ms(r["loop_bwd_s"]), ms(r["vec_fwd_s"]), ms(r["vec_bwd_s"]),
                     f"{r['speedup_fwd']:.0f}x", f"{r['speedup_bwd']:.0f}x", f"{r['speedup_total']:.0f}x",
                     verdict(ok) if target else ""])
    nb = next((r["loop_batch"] for r in layer_rows if r["has_loop"]), "?")
    out += [f"Loop vs vectorized, ms per batch of {BATCH} (loop timed on {nb} example(s), scaled x{BATCH // nb}; "
            f"target for conv/pool: fwd and bwd >= {TARGETS['loop_speedup_conv_pool']:.0f}x)",
            table(["layer", "loop fwd", "loop bwd", "vec fwd", "vec bwd", "speedup fwd", "bwd", "total", "status"],
                  rows, "lrrrrrrrl")]
    return "\n".join(out)


def write_json(path, data):
    """The results as JSON, written atomically (``cnn_files.atomic_write``)."""
    text = json.dumps(data, indent=2, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
    with F.atomic_write(path) as f:
        f.write((text + "\n").encode())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, no epoch/memory run (smoke test)")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results.json"), help="output JSON path")
    parser.add_argument("--epoch-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.epoch_child:
        return epoch_child()
    cfg, began = (QUICK if args.quick else FULL), time.perf_counter()
    res = {"mode": "quick" if args.quick else "full", "timestamp": datetime.now(timezone.utc).isoformat(),
           "machine": machine_info(), "settings": dict(cfg, batch=BATCH, image_shape=list(IMAGE_SHAPE)),
           "targets": TARGETS}
    log("GEMM ...")
    res["gemm"] = gemm = bench_gemm(2048, cfg["gemm_repeats"])
    model = M.mnist_cnn(impl="vectorized", seed=0)
    log("training ...")
    times = bench_training(model, cfg["warmup"], cfg["steps"])
    log("inference ...")
    n = cfg["infer_images"]
    secs = bench_inference(model, n, cfg["infer_repeats"])
    log("layers ...")
    res["layers"] = layers = bench_layers(model, cfg)
    fwd_macs = sum(r["fwd_macs"] for r in layers)                          # per batch of 64
    # fit() skips the first layer's input gradient (Sequential.backward(..., input_grad=False)):
    # that product has as many MACs as the layer's forward (0 if the layer has no weights).
    step_macs = fwd_macs + sum(r["bwd_macs"] for r in layers) - layers[0]["fwd_macs"]
    step = statistics.median(times)
    gflops = 2 * step_macs / step / 1e9
    res["training"] = {"batch": BATCH, "warmup": cfg["warmup"], "steps": len(times), "median_step_s": step,
                       "min_step_s": min(times), "max_step_s": max(times), "images_per_s": BATCH / step,
                       "macs_per_step": step_macs, "gflops": gflops, "fraction_of_gemm": gflops / gemm["gflops"],
                       "meets_target": gflops / gemm["gflops"] >= TARGETS["training_fraction_of_gemm"]}
    gflops = 2 * fwd_macs / BATCH * n / secs / 1e9
    batch = inspect.signature(M.Sequential.predict_proba).parameters["batch_size"].default
    res["inference"] = {"images": n, "batch": batch, "repeats": cfg["infer_repeats"], "seconds": secs,
                        "images_per_s": n / secs, "macs_per_image": fwd_macs // BATCH, "gflops": gflops,
                        "fraction_of_gemm": gflops / gemm["gflops"],
                        "meets_target": gflops / gemm["gflops"] >= TARGETS["inference_fraction_of_gemm"]}
    res["epoch"] = None
    if not args.quick:
        log(f"epoch of {EPOCH_IMAGES:,} images in a subprocess ...")
        res["epoch"] = e = bench_epoch()
        e["meets_target"] = e["peak_rss_mb"] <= TARGETS["epoch_peak_rss_mb"]
    res["bench_seconds"] = time.perf_counter() - began
    write_json(args.json, res)
    print(report(res))
    print(f"\n{res['mode']} run took {res['bench_seconds']:.0f} s; results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
