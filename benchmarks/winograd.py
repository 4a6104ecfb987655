"""Why the 3x3 convolutions stay im2col: Winograd's F(2x2, 3x3) in NumPy, timed against them.

Winograd's minimal filtering (Lavin & Gray 2016) computes each 2x2 block of outputs of a 3x3
filter from a 4x4 tile of input with 16 multiplications instead of 36 (2.25 times fewer):

    Y = A^T [ (G w G^T) * (B^T d B) ] A        (* elementwise, per channel pair)

with U = G w G^T the 4x4 transformed filter, V = B^T d B the transformed tile, and the sum
over input channels becoming 16 matrix products (tiles x C) @ (C x F), one per position of
the 4x4 transformed tile. This script does it in NumPy, channels-last like ``cnn_core``, a
few images at a time, checks it against ``cnn_core.conv2d_forward_vectorized`` and times
both on the 3x3 layers of the report's networks (forward pass only: it is the easy part).

    python benchmarks/winograd.py            # writes benchmarks/winograd.json
    python benchmarks/winograd.py --quick    # two small layers, one repeat (a smoke test)

The transforms are additions of strided slices that each read a few dozen contiguous values
(a pixel's channels), and they cost more than the saved multiplications: winograd.json has,
for every layer, both convolutions' times and that of Winograd's 16 products alone.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import cnn_core as C          # noqa: E402  (the project's modules live one folder up)
import cnn_files as F         # noqa: E402

G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])    # filter transform (4 x 3)
# B^T (input transform) and A^T (output transform) have entries 0 and +-1: written as sums below.
# (batch, C_in, C_out, size) of every 3x3 convolution in the report's networks (bench.py's NETWORKS)
LAYERS = {"cifar_net": [(64, 24, 64, 31), (64, 64, 64, 15), (64, 64, 128, 15), (64, 128, 128, 7),
                        (64, 128, 256, 7), (64, 256, 256, 3)],
          "mnist_net_v2": [(64, 1, 32, 28), (64, 32, 64, 14), (64, 64, 64, 7), (64, 64, 128, 7), (64, 128, 128, 3)],
          "mnist_cnn": [(64, 1, 32, 28), (64, 32, 64, 14)],
          "cifar (notebook 4)": [(64, 3, 32, 32), (64, 32, 32, 32), (64, 32, 64, 16), (64, 64, 64, 16),
                                 (64, 64, 128, 8), (64, 128, 128, 8)]}


def filter_transform(W):
    """W (F, C, 3, 3) -> U (16, C, F): G W[f, c] G^T for every filter and channel."""
    U = np.einsum("ap,fcpq,bq->abcf", G, W.astype(np.float64), G)
    return U.reshape(16, W.shape[1], W.shape[0]).astype(W.dtype)


def input_transform(xp, TH, TW, V):
    """xp (n, 2TH+2, 2TW+2, C) padded input -> V (4, 4, n, TH, TW, C) = B^T d B of every 4x4
    tile d (tiles overlap by 2), with B^T = [[1,0,-1,0], [0,1,1,0], [0,-1,1,0], [0,1,0,-1]]."""
    r = [xp[:, k:k + 2 * TH:2] for k in range(4)]                    # row k of every tile
    rows = [r[0] - r[2], r[1] + r[2], r[2] - r[1], r[1] - r[3]]     # B^T d
    for a, t in enumerate(rows):                                    # (B^T d) B, column by column
        c = [t[:, :, k:k + 2 * TW:2] for k in range(4)]
        np.subtract(c[0], c[2], out=V[a, 0])
        np.add(c[1], c[2], out=V[a, 1])
        np.subtract(c[2], c[1], out=V[a, 2])
        np.subtract(c[1], c[3], out=V[a, 3])


def output_transform(M, out, bias):
    """M (4, 4, n, TH, TW, F) -> out (n, OH, OW, F) = A^T M A + bias for every tile, with
    A^T = [[1, 1, 1, 0], [0, 1, -1, -1]] (odd sizes: the last row/column is dropped)."""
    for i, s in enumerate((M[0] + M[1] + M[2], M[1] - M[2] - M[3])):          # A^T M
        rows = out[:, i::2]
        for j, y in enumerate((s[0] + s[1] + s[2], s[1] - s[2] - s[3])):     # (A^T M) A
            dst = rows[:, :, j::2]
            np.add(y[:, :dst.shape[1], :dst.shape[2]], bias, out=dst)


def winograd_conv(x, W, b, images=8, work=None):
    """3x3 convolution, stride 1, padding 1: x (N, H, W, C) channels-last -> (N, H, W, F),
    ``images`` at a time; ``work``: a ``cnn_core.Workspace`` for the padded input and the
    transformed tiles, reused from call to call as the im2col convolution reuses its own."""
    work = C.Workspace() if work is None else work
    N, H, Wd, Cin = x.shape
    Fo = W.shape[0]
    TH, TW = (H + 1) // 2, (Wd + 1) // 2                            # 2x2 output tiles
    xp = work.get("xp", (N, 2 * TH + 2, 2 * TW + 2, Cin), x.dtype, zeros=True)   # the border stays 0
    xp[:, 1:1 + H, 1:1 + Wd] = x
    U = filter_transform(W)
    out = np.empty((N, H, Wd, Fo), x.dtype)
    V = work.get("V", (4, 4, images, TH, TW, Cin), x.dtype)
    M = work.get("M", (4, 4, images, TH, TW, Fo), x.dtype)
    for n0 in range(0, N, images):
        n = min(images, N - n0)
        input_transform(xp[n0:n0 + n], TH, TW, V[:, :, :n])
        np.matmul(V[:, :, :n].reshape(16, -1, Cin), U, out=M[:, :, :n].reshape(16, -1, Fo))   # 16 GEMMs
        output_transform(M[:, :, :n], out[n0:n0 + n], b)
    return out


def median_ms(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def compare(batch, cin, cout, size, repeats, rng):
    x = rng.standard_normal((batch, size, size, cin), dtype=np.float32)
    W = (rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(9 * cin)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    nchw = x.transpose(0, 3, 1, 2)                                   # cnn_core's interface, same memory
    work = C.Workspace()
    ref = C.channels_last(C.conv2d_forward_vectorized(nchw, W, b, padding=(1, 1), work=work)[0])
    error = float(np.abs(winograd_conv(x, W, b) - ref).max() / np.abs(ref).max())
    if error > 1e-5:
        raise AssertionError(f"Winograd and im2col disagree on {(batch, cin, cout, size)}: relative error {error:.1e}")
    im2col = median_ms(lambda: C.conv2d_forward_vectorized(nchw, W, b, padding=(1, 1), work=work), repeats)
    wino_work = C.Workspace()
    winograd = median_ms(lambda: winograd_conv(x, W, b, work=wino_work), repeats)
    # its 16 products alone, on every tile at once: the rest of its time is the transforms
    T = batch * ((size + 1) // 2) ** 2
    V, U = rng.standard_normal((16, T, cin), dtype=np.float32), filter_transform(W)
    M = np.empty((16, T, cout), np.float32)
    products = median_ms(lambda: np.matmul(V, U, out=M), repeats)
    return {"batch": batch, "in_channels": cin, "out_channels": cout, "size": size, "relative_error": error,
            "im2col_ms": im2col, "winograd_ms": winograd, "winograd_products_ms": products,
            "winograd_over_im2col": winograd / im2col}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two small layers, one repeat")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "winograd.json"))
    args = parser.parse_args(argv)
    layers, repeats = ({"smoke": [(4, 8, 16, 7), (2, 16, 8, 6)]}, 1) if args.quick else (LAYERS, 9)
    rng = np.random.default_rng(0)
    rows, done = [], {}
    for network, shapes in layers.items():
        for shape in shapes:
            if shape not in done:                                    # a layer two networks share: once
                done[shape] = compare(*shape, repeats, rng)
                r = done[shape]
                print(f"batch {r['batch']}, {r['in_channels']}->{r['out_channels']} at {r['size']}x{r['size']}: "
                      f"im2col {r['im2col_ms']:.2f} ms, Winograd {r['winograd_ms']:.2f} ms "
                      f"({r['winograd_over_im2col']:.2f}x; its products alone {r['winograd_products_ms']:.2f} ms), "
                      f"relative difference {r['relative_error']:.0e}", flush=True)
            rows.append({"network": network, **done[shape]})
    result = {"timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"), "quick": args.quick,
              "repeats": repeats, "layers": rows}
    with F.atomic_write(args.json) as f:
        f.write((json.dumps(result, indent=1) + "\n").encode())


if __name__ == "__main__":
    main()
