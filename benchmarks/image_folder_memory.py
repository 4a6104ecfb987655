"""Time and peak memory of a Tiny-ImageNet-sized image folder: decoding, the cache, one epoch.

    .venv/bin/python benchmarks/image_folder_memory.py                  # 200 classes x 500 = 100,000
                                                                        # training images of 64x64 (~7 min)
    .venv/bin/python benchmarks/image_folder_memory.py --per-class 25   # a quick run (seconds)
    .venv/bin/python benchmarks/image_folder_memory.py --batches 300    # train on 300 batches, not the epoch

A synthetic set in the Tiny ImageNet layout (JPEG files, wnids.txt, words.txt,
val_annotations.txt, an unlabelled test/) is generated once under --dir (kept for reruns;
deleted with --clean). Then, each step in a fresh subprocess so that its peak resident
memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) counts that step alone:

  1. ``load_image_folder`` with an empty cache (listing, content hash, decoding, cache
     write; the arrays stay uint8), then one ``fit`` epoch (batch 64, Adam) of a small
     200-class CNN (``conv_net_for``) on the uint8 arrays and ``evaluate`` on the test set:
     seconds and peak RSS after loading and after training.
  2. ``load_image_folder`` again: served from the cache (seconds, of which content hashing).

Writes the numbers to benchmarks/image_folder_memory.json (or --json). Target: peak RSS of
step 1 <= 3 GB. Uses both cores when free; other work on the machine slows it down (the
load average before the run is recorded).
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9     # Linux: KiB


def worker_decode_and_train(folder, cache, batches):
    import numpy as np
    import cnn_images as I
    import cnn_model as M
    import cnn_train as T
    began = time.perf_counter()
    data = I.load_image_folder(folder, data_dir=cache, log=lambda m: print(m, file=sys.stderr))
    result = {"decode_seconds": time.perf_counter() - began, "load_peak_rss_gb": peak_rss_gb(),
              "x_train": list(data.x_train.shape), "x_test": list(data.x_test.shape),
              "dtype": str(data.x_train.dtype), "classes": len(data.class_names),
              "array_gb": sum(x.nbytes for x in (data.x_train, data.x_val, data.x_test)) / 1e9}
    model = M.conv_net_for(data, channels=(8, 16), hidden=0, dropout=0.25, seed=0)
    n = len(data.x_train) if batches is None else min(len(data.x_train), 64 * batches)
    # A prefix view of the full array: the whole set stays resident, as in a real epoch.
    history = T.fit(model, data.x_train[:n], data.y_train[:n], T.Adam(1e-3), epochs=1, batch_size=64,
                    progress=False, log=None)
    began = time.perf_counter()
    _, accuracy = T.evaluate(model, data.x_test, data.y_test)
    result.update(trained_images=n, epoch_seconds=history.seconds[0], steps=-(-n // 64),
                  evaluate_seconds=time.perf_counter() - began, test_accuracy=accuracy,
                  train_loss=history.train_loss[0], peak_rss_gb=peak_rss_gb())
    return result


def worker_cached(folder, cache):
    import hashlib
    import cnn_images as I
    began = time.perf_counter()
    with I._open_source(Path(folder)) as source:
        source.content_key(hashlib.sha256())
    hashing = time.perf_counter() - began
    lines = []
    began = time.perf_counter()
    data = I.load_image_folder(folder, data_dir=cache, log=lines.append)
    seconds = time.perf_counter() - began
    assert "from the cache" in lines[0], lines[0]
    return {"cached_load_seconds": seconds, "hash_seconds": hashing, "cached_peak_rss_gb": peak_rss_gb(),
            "x_train": list(data.x_train.shape)}


def run_worker(*args):
    out = subprocess.run([sys.executable, __file__, "--worker", *map(str, args)], check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/cnn-image-folder-bench"))
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--per-class", type=int, default=500, help="training images per class")
    parser.add_argument("--val-per-class", type=int, default=50, help="val (= test) images per class")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=None, help="train on this many batches, not a full epoch")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "image_folder_memory.json")
    parser.add_argument("--clean", action="store_true", help="delete the generated set and cache afterwards")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        kind, *rest = args.worker
        if kind == "decode-train":
            result = worker_decode_and_train(rest[0], rest[1], None if rest[2] == "None" else int(rest[2]))
        else:
            result = worker_cached(*rest)
        print(json.dumps(result))
        return

    import cnn_files as F
    import cnn_images as I
    name = f"tiny-{args.classes}x{args.per_class}-{args.size}px"
    folder, cache = args.dir / name, args.dir / "cache"
    results = {"load_average_before": os.getloadavg(), "cpus": os.cpu_count(), "folder": str(folder),
               "layout": "Tiny ImageNet (JPEG)", "classes": args.classes, "per_class": args.per_class,
               "val_per_class": args.val_per_class, "size": args.size}
    if not (folder / "val" / "val_annotations.txt").exists():
        began = time.perf_counter()
        I.make_example_folder(folder, layout="tiny-imagenet", num_classes=args.classes, per_class=args.per_class,
                              test_per_class=args.val_per_class, size=args.size)
        results["generate_seconds"] = time.perf_counter() - began
    files = [p for p in folder.rglob("*") if p.is_file()]
    results.update(files=len(files), folder_mb=sum(p.stat().st_size for p in files) / 1e6)
    shutil.rmtree(cache, ignore_errors=True)
    print(f"{name}: {len(files):,} files, {results['folder_mb']:.0f} MB; decoding and training ...", flush=True)
    results.update(run_worker("decode-train", folder, cache, args.batches))
    results["cache_mb"] = sum(p.stat().st_size for p in cache.rglob("*.npz")) / 1e6
    results.update(run_worker("cached", folder, cache))
    results["float32_gb_if_not_uint8"] = 4 * results["array_gb"]
    F.save_json(args.json, results)
    print(json.dumps(results, indent=1))
    print(f"decode {results['decode_seconds']:.1f} s (cache {results['cache_mb']:.0f} MB), second load "
          f"{results['cached_load_seconds']:.1f} s (hashing {results['hash_seconds']:.1f} s); one epoch of "
          f"{results['trained_images']:,} images {results['epoch_seconds']:.0f} s; peak RSS "
          f"{results['load_peak_rss_gb']:.2f} GB after loading, {results['peak_rss_gb']:.2f} GB after the epoch")
    if args.clean:
        shutil.rmtree(args.dir / name, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
