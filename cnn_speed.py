"""The report's speed chapter: the loop and vectorized versions of every layer of
a network timed side by side, and ``benchmarks/bench.py`` run from a notebook,
its results as Markdown tables (the README's speed table, the per-layer table).

The benchmark itself lives in ``benchmarks/`` (one run measures everything, see
``benchmarks/README.md``); these functions only run and present it.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cnn_report import MarkdownText, markdown_table

ROOT = Path(__file__).resolve().parent
BENCH_SCRIPT = ROOT / "benchmarks" / "bench.py"


def _best_time(run, repeats):
    """(the fastest of ``repeats`` timings of run(), its last result): the minimum is
    the time least disturbed by other work on a shared machine."""
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - began)
    return min(times), result


def loop_vs_vectorized(model, x, repeats=5):
    """A Markdown table: each layer of ``model`` that has both implementations run
    as "loop" and as "vectorized" on the same batch x (its input there), forward
    with ``training=True`` and backward of ones: the largest difference of the
    output and the input gradient, and the time of each (the loop once, the
    vectorized version the fastest of ``repeats``). Layers are left as found."""
    rows, activation = [], x
    for layer in model.layers:
        if not hasattr(layer, "impl"):
            activation = layer.forward(activation, training=False)
            continue
        found, times, outputs = layer.impl, {}, {}
        for impl, n in (("loop", 1), ("vectorized", repeats)):
            layer.impl = impl

            def run():
                out = layer.forward(activation, training=True)
                return out, layer.backward(np.ones_like(out))
            times[impl], outputs[impl] = _best_time(run, n)
        layer.impl = found
        diff = max(float(np.abs(a - b).max()) for a, b in zip(outputs["loop"], outputs["vectorized"]))
        rows.append([layer.label(), f"{diff:.1e}", f"{times['loop'] * 1e3:,.0f}", f"{times['vectorized'] * 1e3:.2f}",
                     f"{times['loop'] / times['vectorized']:,.0f}x"])
        activation = outputs["vectorized"][0]
    return markdown_table(["layer", "max difference", "loop ms (fwd+bwd)", "vectorized ms", "speed-up"], rows)


# ---------------------------------------------------------------------------
# The speed benchmark (benchmarks/bench.py)
# ---------------------------------------------------------------------------

def run_benchmark(json_path, quick=False, script=BENCH_SCRIPT):
    """Run the benchmark ``script`` in a fresh Python process, as ``make bench``
    does, with its results written to ``json_path``; return them (parsed JSON).
    Raises RuntimeError with the end of the benchmark's error output if it fails."""
    command = [sys.executable, str(script), "--json", str(json_path)] + (["--quick"] if quick else [])
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed (exit status {done.returncode}):\n"
                           + "\n".join((done.stderr or done.stdout).splitlines()[-20:]))
    return json.loads(Path(json_path).read_text())


def _get(record, *keys):
    """record[k1][k2]... or None when a level is missing (the benchmark's JSON may
    gain or lose fields: the report shows what is there)."""
    for key in keys:
        if not isinstance(record, dict) or record.get(key) is None:
            return None
        record = record[key]
    return record


def _bench_module(script=BENCH_SCRIPT):
    """``benchmarks/bench.py`` (a script, not a package module) imported from its file."""
    spec = importlib.util.spec_from_file_location("cnn_bench_script", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module                 # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def benchmark_summary(json_path, script=BENCH_SCRIPT):
    """(sentence, training table, inference table) of a results file of
    ``benchmarks/bench.py``: the README's speed table (``bench.py --markdown``, the same
    cells from ``speed_summary``) as its sentence naming the run and the kernel, and its
    columns in two narrower Markdown tables (the PDF scales a too-wide table down):
    network, ceiling and training step; network, inference and epoch."""
    bench = _bench_module(script)
    try:
        sentence, rows = bench.speed_summary(json.loads(Path(json_path).read_text()))
    except (KeyError, TypeError) as error:
        raise ValueError(f"benchmark_summary: {json_path} is not a results file of {Path(script).name} "
                         f"(no {error}); write one with `make bench`") from None
    header = bench.SPEED_HEADER

    def columns(picked):
        return markdown_table([header[c] for c in picked], [[row[c] for c in picked] for row in rows])
    return MarkdownText(sentence), columns([0, 1, 2, 3]), columns([0, 4, 5, 6])


def benchmark_layer_table(bench, network):
    """A Markdown table of one network's per-layer times in a benchmark results
    dict (``bench["networks"][network]["layers"]``): forward and backward
    milliseconds at batch 64 and the GFLOP/s they reach, beside (in brackets)
    those of a plain GEMM of the layer's own shape; layers without matrix
    products show times only."""
    net = _get(bench, "networks", network)
    if net is None:
        raise ValueError(f"benchmark_layer_table: no network {network!r} in the results "
                         f"(have {sorted(_get(bench, 'networks') or {})})")

    def rate(value, gemm):
        return "" if not value else f"{value:.0f}" + (f" ({gemm:.0f})" if gemm else "")

    rows = [[r["name"], f"{r['fwd_s'] * 1e3:.2f}", rate(r.get("fwd_gflops"), (r.get("gemm_gflops") or {}).get("fwd")),
             f"{r['bwd_s'] * 1e3:.2f}" if r.get("bwd_s") else "", rate(r.get("bwd_gflops"), r.get("gemm_bwd_gflops"))]
            for r in net["layers"]]
    return markdown_table(["layer", "forward ms", "GFLOP/s (GEMM)", "backward ms", "GFLOP/s (GEMM)"], rows)

