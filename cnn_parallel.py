"""Data parallelism: a training step on every core (``DataParallel``).

NumPy runs its elementwise work (the im2col copies, pooling, batch norm, ReLU) on
one core; OpenBLAS splits each matrix product across its threads, but a product
of one im2col block is too short to split well. So one step of the CIFAR-10
network at batch 64 on two cores took 326 ms with OpenBLAS's two threads and
219 ms as two halves of the batch in two threads, each with a one-thread
OpenBLAS (``benchmarks/README.md`` has the current figures).

``DataParallel(model, threads)`` does the latter for ``forward`` / ``backward``:
the batch is cut into ``threads`` parts of consecutive images; part k runs through
replica k of the model (replica 0 is the model itself; the others are shallow
copies of its layers that share the parameter arrays) in a thread of its own. The
maths is the whole batch's, up to the order of floating-point additions:

- a parameter's gradient is the sum of the replicas' (the loss gradient ``dout``
  is already divided by the whole batch's size);
- batch norm sums its statistics over all parts (``AllSum``), so every part is
  normalised with the whole batch's mean and variance, and its backward pass uses
  the whole batch's dgamma and dbeta; the running averages are updated once;
- a dropout mask is drawn per part, from a generator seeded from the model's own
  (so a checkpoint that saves the model's generators resumes the same masks).

Only the vectorized batch norm takes part-wise statistics (``allsum``); a model
with a loop batch norm trains on one thread.
"""
from __future__ import annotations

import copy
import ctypes
import glob
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from cnn_layers import BatchNorm, Dropout


def _openblas():
    """NumPy's bundled OpenBLAS (ctypes) if it can set a thread's own number of threads
    (``openblas_set_num_threads_local``, OpenBLAS 0.3.27 and later), else None."""
    here = os.path.dirname(np.__file__)
    for path in (glob.glob(os.path.join(here, os.pardir, "numpy.libs", "*openblas*"))
                 + glob.glob(os.path.join(here, ".dylibs", "*openblas*"))):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        if hasattr(lib, "openblas_set_num_threads_local"):
            lib.openblas_set_num_threads_local.argtypes = [ctypes.c_int]
            return lib
    return None


_BLAS = _openblas()


def default_threads():
    """The number of parts ``cnn_train.fit`` splits a batch into by default: OpenBLAS's
    own thread count (one per core, or OPENBLAS_NUM_THREADS), so that a process given
    one thread (the report build runs two notebooks side by side, each with one) stays
    on one core; 1 where OpenBLAS cannot set a thread's own count."""
    if _BLAS is None:
        return 1
    for name in ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_", "openblas_get_num_threads"):
        get = getattr(_BLAS, name, None)
        if get is not None:
            get.restype = ctypes.c_int
            return max(1, get())
    return 1


def parallel(model, threads=None):
    """What ``cnn_train.fit`` trains through: ``DataParallel(model, threads)``, or the
    model itself for one thread. threads: a positive int, or None for
    ``default_threads()`` (then 1 when the model has a loop batch norm)."""
    if threads is None:
        loop_norm = any(isinstance(layer, BatchNorm) and layer.impl != "vectorized" for layer in model.layers)
        threads = 1 if loop_norm else default_threads()
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    return model if threads == 1 else DataParallel(model, threads)


class AllSum:
    """Sums values across the ``parties`` threads of one step: each thread calls
    ``reduce(rank, *values)`` at the same point and gets the same sums back, added
    in rank order (so every part normalises with identical statistics)."""

    def __init__(self, parties):
        self.barrier = threading.Barrier(parties)
        self.slots = [None] * parties

    def reduce(self, rank, *values):
        self.slots[rank] = values
        self.barrier.wait()
        sums = tuple(sum(column[1:], column[0]) for column in zip(*self.slots))
        self.barrier.wait()                    # no slot is overwritten before every thread has read
        return sums

    def member(self, rank):
        """The ``allsum`` function of replica ``rank``."""
        return lambda *values: self.reduce(rank, *values)


def _one_blas_thread():
    if _BLAS is not None:
        _BLAS.openblas_set_num_threads_local(1)


class DataParallel:
    """``forward`` / ``backward`` of ``model`` (a ``cnn_model.Sequential``) with each
    batch split into ``threads`` parts run side by side, one thread each (see the module's
    docstring). After ``backward`` the model's layers hold the whole batch's gradients,
    as after ``model.backward``; optimisers and weight averages work on ``model``."""

    def __init__(self, model, threads):
        if any(isinstance(layer, BatchNorm) and layer.impl != "vectorized" for layer in model.layers):
            raise ValueError("DataParallel: a batch norm with impl='loop' cannot share its statistics "
                             "across threads; use impl='vectorized' or one thread")
        self.model, self.threads = model, int(threads)
        self.pool = ThreadPoolExecutor(self.threads, initializer=_one_blas_thread)
        self.works = [[None] * len(model.layers) for _ in range(self.threads)]   # replicas' scratch arrays
        self.replicas = None

    def _replicas(self, parts, training):
        """Replica k for each part k: the model's layers themselves first, then shallow
        copies of them (made afresh each step, so that they see the model's current
        arrays) with their own caches, gradients, scratch arrays and batch-norm buffers."""
        replicas = []
        for k in range(parts):
            layers = []
            for i, layer in enumerate(self.model.layers):
                r = layer
                if k:
                    r = copy.copy(layer)
                    r._cache, r.grads, r._work = None, {}, self.works[k][i]
                    r.buffers = {name: a.copy() for name, a in layer.buffers.items()}   # updated by the model's only
                    if isinstance(layer, Dropout) and training and layer.p:
                        r.rng = np.random.default_rng(layer.rng.integers(2 ** 63))
                layers.append(r)
            replicas.append(layers)
        return replicas

    def _run(self, task, parts, sync):
        """``task(k)`` for every part k in the pool, each batch norm of replica k summing
        with the others through one ``AllSum`` when ``sync``; the results in order. The
        first error is raised again (a failing part breaks the barrier, so that no other
        part waits for it forever); batch norms are left unsynchronised either way."""
        allsum = AllSum(parts) if sync else None
        for k, layers in enumerate(self.replicas):
            for layer in layers:
                if isinstance(layer, BatchNorm):
                    layer.allsum = allsum.member(k) if sync else None

        def guarded(k):
            try:
                return task(k)
            except BaseException:
                if allsum is not None:
                    allsum.barrier.abort()
                raise
        try:
            futures = [self.pool.submit(guarded, k) for k in range(parts)]
            errors = [e for e in (f.exception() for f in futures) if e is not None]
        finally:
            for layer in self.model.layers:
                if isinstance(layer, BatchNorm):
                    layer.allsum = None
        if errors:      # the part that failed first, not one that only saw the broken barrier
            raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
        return [f.result() for f in futures]

    def forward(self, x, training=True):
        """The model's output for x (N, ...), computed in min(threads, N) parts."""
        parts = max(1, min(self.threads, len(x)))
        self.bounds = bounds = np.linspace(0, len(x), parts + 1).astype(int)
        self.replicas = self._replicas(parts, training)

        def forward(k):
            xs = x[bounds[k]:bounds[k + 1]]
            for layer in self.replicas[k]:
                xs = layer.forward(xs, training)
            return xs
        outs = self._run(forward, parts, sync=training and parts > 1)
        for k in range(1, parts):                   # keep the replicas' scratch arrays for the next step
            for i, r in enumerate(self.replicas[k]):
                self.works[k][i] = r.__dict__.get("_work")
        if not training:
            self.replicas = None
        return outs[0] if parts == 1 else np.concatenate(outs)

    def backward(self, dout, input_grad=True):
        """Backpropagate dout through every replica (``Sequential.backward``) and leave
        the sums of their gradients in the model's layers; returns dx (N, ...) or None."""
        if self.replicas is None:
            raise RuntimeError("DataParallel: backward() called before forward(training=True)")
        parts, bounds = len(self.replicas), self.bounds
        views = [copy.copy(self.model) for _ in range(parts)]
        for view, layers in zip(views, self.replicas):
            view.layers = layers
        dxs = self._run(lambda k: views[k].backward(dout[bounds[k]:bounds[k + 1]], input_grad), parts,
                        sync=parts > 1)
        for i, layer in enumerate(self.model.layers):      # layers below the trained ones got no backward
            others = [r[i].grads for r in self.replicas[1:]]
            if others and all(others):
                layer.grads = {name: sum((g[name] for g in others), grad.copy()) for name, grad in layer.grads.items()}
        self.replicas = None
        if dxs[0] is None:
            return None
        return dxs[0] if parts == 1 else np.concatenate(dxs)

    def logits(self, x, tta=None):
        """``Sequential.logits`` (evaluation mode, optional test-time augmentation) with
        every view's forward pass split across the threads."""
        return type(self.model).logits(self, x, tta)      # it only calls self.forward

    def close(self):
        """Stop the worker threads."""
        self.pool.shutdown()
