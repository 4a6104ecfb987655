"""Tests of cnn_speed: the loop-vs-vectorized table and the benchmark run and tables."""
import json
import subprocess
import sys

import numpy as np
import pytest

import cnn_core as C
import cnn_layers as L
import cnn_model as M
import cnn_speed as B


def test_loop_vs_vectorized_compares_every_dual_layer():
    model = M.Sequential([L.Conv2D(1, 2, 3, padding=1), L.ReLU(), L.MaxPool2D(2), L.Flatten(), L.Dense(8, 3)], seed=0)
    x = np.random.default_rng(0).standard_normal((2, 1, 4, 4)).astype(np.float32)
    lines = str(B.loop_vs_vectorized(model, x, repeats=2)).splitlines()
    assert [line.split(" | ")[0].strip("| ") for line in lines[2:]] == [
        "Conv2D 1->2 3x3 pad 1", "ReLU", "MaxPool2D 2x2", "Dense 8->3"]
    assert all(float(line.split(" | ")[1]) < 1e-5 for line in lines[2:])
    assert all(layer.impl == "vectorized" for layer in model.layers if hasattr(layer, "impl"))


# ---------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------

def test_run_benchmark_runs_the_script_and_reads_its_json(tmp_path):
    script = tmp_path / "fake_bench.py"
    script.write_text("import json, sys\n"
                      "args = sys.argv[1:]\n"
                      "path = args[args.index('--json') + 1]\n"
                      "print('noise on stdout')\n"
                      "json.dump({'mode': 'quick' if '--quick' in args else 'full'}, open(path, 'w'))\n")
    assert B.run_benchmark(tmp_path / "b.json", quick=True, script=script) == {"mode": "quick"}
    assert B.run_benchmark(tmp_path / "b.json", script=script) == {"mode": "full"}


def test_run_benchmark_failure_shows_the_error(tmp_path):
    script = tmp_path / "broken.py"
    script.write_text("import sys\nsys.exit('GEMM exploded')\n")
    with pytest.raises(RuntimeError, match="(?s)exit status 1.*GEMM exploded"):
        B.run_benchmark(tmp_path / "b.json", script=script)


BENCH = {
    "mode": "full", "timestamp": "2026-11-25T22:20:00+00:00", "gemm": {"n": 2048, "gflops": 300.0},
    "machine": {"openblas": {"corename": "SkylakeX", "threads": 2}, "blas_env": {}},
    "networks": {"net": {
        "training": {"median_s": 0.02, "images_per_s": 3200.0, "gflops": 60.0, "fraction_of_gemm": 0.2, "target": 0.3,
                     "products_bound_fraction": 0.62},
        "inference": {"images_per_s": 9000.0, "gflops": 70.0, "fraction_of_gemm": 0.233},
        "epoch": {"images": 55000, "seconds": 20.5, "peak_rss_mb": 400.0},
        "layers": [
            {"name": "0 Conv2D 1->32 3x3 pad 1", "fwd_s": 0.0014, "bwd_s": 0.0013, "fwd_gflops": 20.4,
             "bwd_gflops": 23.0, "gemm_gflops": {"fwd": 70.4, "dW": 40.4}, "gemm_bwd_gflops": 40.4},
            {"name": "1 ReLU", "fwd_s": 0.0006, "bwd_s": 0.0014, "fwd_gflops": None, "bwd_gflops": None}]}},
}


def test_benchmark_summary_is_bench_py_markdown_split_in_two(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(BENCH))
    sentence, training, inference = B.benchmark_summary(path)
    assert sentence.startswith("Measured 2026-11-25 (full run), kernel: OpenBLAS core SkylakeX, 2 threads")
    training, inference = training.splitlines(), inference.splitlines()
    assert training[0] == "| network | GEMM ceiling | training step, batch 64 | % of GEMM (target, products alone) |"
    assert training[2] == "| net | 300 GFLOP/s | 20.0 ms = 3,200 img/s = 60 GFLOP/s | **20.0%** (30%, 62%) |"
    assert inference[0] == "| network | inference | % of GEMM (target, products alone) | epoch |"
    assert inference[2] == ("| net | 9,000 img/s = 70 GFLOP/s | **23.3%** | 55,000 images: 20.5 s, peak 400 MB |")
    readme = subprocess.run([sys.executable, str(B.BENCH_SCRIPT), "--markdown", "--json", str(path)],
                            capture_output=True, text=True, check=True).stdout.splitlines()
    assert readme[0] == sentence and readme[4] == ("| net | 300 GFLOP/s | 20.0 ms = 3,200 img/s = 60 GFLOP/s | "
                                                   "**20.0%** (30%, 62%) | 9,000 img/s = 70 GFLOP/s | **23.3%** | "
                                                   "55,000 images: 20.5 s, peak 400 MB |")
    path.write_text("{}")
    with pytest.raises(ValueError, match="not a results file of bench.py .*make bench"):
        B.benchmark_summary(path)


def test_benchmark_layer_table_rows_and_missing_numbers():
    lines = B.benchmark_layer_table(BENCH, "net").splitlines()
    assert lines[0] == "| layer | forward ms | GFLOP/s (GEMM) | backward ms | GFLOP/s (GEMM) |"
    assert lines[2] == "| 0 Conv2D 1->32 3x3 pad 1 | 1.40 | 20 (70) | 1.30 | 23 (40) |"
    assert lines[3] == "| 1 ReLU | 0.60 |  | 1.40 |  |"
    with pytest.raises(ValueError, match="no network 'cifar'"):
        B.benchmark_layer_table(BENCH, "cifar")


def test_threads_probe_splits_a_step_into_the_same_update_and_restores_openblas(tmp_path, monkeypatch):
    # benchmarks/threads.py times a batch split across threads against OpenBLAS's threads: without
    # batch norm its update must be the whole batch's, and OpenBLAS's thread count must come back.
    monkeypatch.syspath_prepend(str(B.ROOT / "benchmarks"))
    import threads
    from concurrent.futures import ThreadPoolExecutor
    import cnn_layers as L
    import cnn_model as M

    def net():
        return M.Sequential([L.Conv2D(1, 3, 3, padding=1, dtype=np.float64), L.ReLU(), L.MaxPool2D(2), L.Flatten(),
                             L.Dense(3 * 3 * 3, 4, dtype=np.float64)], seed=2)
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((7, 1, 6, 6)), rng.integers(0, 4, 7)
    whole, split = net(), net()
    blas = threads.blas_threads()
    before = blas[0]() if blas else None
    threads.training_step(whole, L, threads.T)(x, y)                 # bench.py's step, as threads.py times it
    with ThreadPoolExecutor(2) as pool:
        threads.split_step(split, 2, pool, blas)(x, y)
    assert (blas[0]() if blas else None) == before
    for (_, a, _), (_, b, _) in zip(whole.parameters(), split.parameters()):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-14)
    threads.main(["--quick", "--json", str(tmp_path / "t.json")])
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["unsplit_ms"] > 0 and rows[0]["split_ms"] > 0


def test_winograd_probe_computes_the_loop_convolution(tmp_path, monkeypatch):
    # benchmarks/winograd.py times Winograd F(2x2, 3x3) against im2col: its convolution must be
    # the same maths (odd and even sizes, float64), and the script writes its measurements.
    monkeypatch.syspath_prepend(str(B.ROOT / "benchmarks"))
    import winograd
    rng = np.random.default_rng(7)
    for n, c, f, size in ((2, 3, 4, 5), (1, 2, 3, 6), (3, 1, 2, 1)):
        x, W, b = rng.standard_normal((n, c, size, size)), rng.standard_normal((f, c, 3, 3)), rng.standard_normal(f)
        expected = C.conv2d_forward_loop(x, W, b, padding=(1, 1))[0]
        got = winograd.winograd_conv(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), W, b, images=2)
        np.testing.assert_allclose(got.transpose(0, 3, 1, 2), expected, rtol=1e-10, atol=1e-12)
    winograd.main(["--quick", "--json", str(tmp_path / "w.json")])
    rows = json.loads((tmp_path / "w.json").read_text())["layers"]
    assert len(rows) == 2 and all(r["relative_error"] < 1e-5 and r["winograd_ms"] > 0 for r in rows)
