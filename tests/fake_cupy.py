"""A stand-in for CuPy, over NumPy, so that the GPU code's bookkeeping runs on any machine.

gpt2_cupy adds no arithmetic of its own: it is gpt2_numpy's forward on CuPy arrays, plus
graphs.py, which decides which forward runs as which CUDA graph (one per cache and T, chunks of
16 for long catch-ups, caches handed out again with their graphs, warm_up). That deciding is
plain Python, and a machine without a GPU can check it if "CuPy" is NumPy and a "CUDA graph" is
a recording that re-runs the forward it recorded, writing into the same output array as a real
replay writes into the same addresses. See `installed`.

What it checks of CUDA: a host transfer inside a capture raises, as CUDA refuses it; and stream
order. Everything runs at once here, but each launch (a kernel, a graph, a host -> device copy)
is noted with the memory it reads and writes and the stream it was issued on, and a launch that
touches memory that unfinished work of another stream writes (or reads, where it writes), with
nothing ordering the two, raises StreamRace: on a GPU the two could run at the same time. Work
is finished by a synchronize or a host transfer on its stream, and ordered by the legacy default
stream's rule (work on it waits for, and is waited for by, the blocking streams' work) or by an
Event a stream waits on. What it cannot check: anything else CUDA does (what else a capture
refuses, memory pools, cuBLAS, float32 rounding on the device), nor a device array used as a host
one (NumPy accepts these arrays, which are NumPy's; CuPy refuses np.asarray of its own).
tests/test_cupy.py runs the same tests on a real GPU when there is one.
"""
import contextlib
import sys
import time
import types

import numpy as np

__version__ = "0.0-fake"


class ndarray(np.ndarray):
    """A "device" array: a NumPy array whose type says it is CuPy's (backend.namespace_of reads
    the module of the type), with CuPy's host transfers (`set`, `get`) and device pointer."""

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.__array_interface__["data"][0])

    def set(self, host) -> None:
        _no_host_transfer_while_capturing()
        launch(writes=[self])
        self[...] = host

    def get(self) -> np.ndarray:
        _no_host_transfer_while_capturing()
        launch(reads=[self])
        _finish(_streams[-1])
        return np.array(self, copy=True).view(np.ndarray)

    def __getitem__(self, key):
        out = super().__getitem__(key)  # an element stays on the device, a 0-d array, as in CuPy
        return out if isinstance(out, np.ndarray) else np.asarray(out).view(ndarray)

    # A device value read on the host (int(x), if x: ..., x.item()) waits for the device: not
    # allowed in a capture, so a forward that does it could not be a graph.
    def item(self, *args):
        _no_host_transfer_while_capturing()
        return self.view(np.ndarray).item(*args)

    def tolist(self):
        _no_host_transfer_while_capturing()
        return self.view(np.ndarray).tolist()

    def __int__(self):
        _no_host_transfer_while_capturing()
        return int(self.view(np.ndarray))

    def __float__(self):
        _no_host_transfer_while_capturing()
        return float(self.view(np.ndarray))

    def __bool__(self):
        _no_host_transfer_while_capturing()
        return bool(self.view(np.ndarray))

    def __index__(self):
        _no_host_transfer_while_capturing()
        return self.view(np.ndarray).__index__()


ndarray.__module__ = "cupy"


def _device(x):
    return x.view(ndarray) if isinstance(x, np.ndarray) and not isinstance(x, ndarray) else x


def __getattr__(name):
    """cupy.<name> is numpy.<name>, with array results on the "device"."""
    obj = getattr(np, name)
    if isinstance(obj, type) or not callable(obj):
        return obj  # dtypes (cupy.float32), constants
    return lambda *args, **kwargs: _device(obj(*args, **kwargs))


class _Generator:
    """cupy.random.Generator: NumPy's, with its arrays on the "device"."""

    def __init__(self, seed=None):
        self.rng = np.random.default_rng(seed)

    def standard_normal(self, size=None, dtype=np.float64):
        return _device(self.rng.standard_normal(size, dtype=dtype))


random = types.SimpleNamespace(default_rng=_Generator)


def asnumpy(x) -> np.ndarray:
    return x.get() if isinstance(x, ndarray) else np.asarray(x)


class CUDARuntimeError(RuntimeError):
    pass


def _no_host_transfer_while_capturing():
    if any(stream.capturing for stream in _streams):
        raise CUDARuntimeError("cudaErrorStreamCaptureUnsupported: a host transfer in a capture")
    _finish(_streams[-1])  # a value read on the host waits for its stream


class StreamRace(AssertionError):
    """Two launches on different streams touch the same memory, at least one writing, and
    nothing orders them: on a GPU they could overlap."""


class _Work:
    """One launch not yet known to be finished: its stream, and the arrays it reads and writes
    (held, so that their memory is not handed to another array meanwhile: CuPy's pool reuses
    memory on the stream that freed it only)."""

    def __init__(self, stream, reads, writes):
        self.stream, self.reads, self.writes = stream, reads, writes


_pending = []  # _Work, oldest first


def _bounds(arrays):
    from numpy.lib.array_utils import byte_bounds

    return [byte_bounds(a) for a in arrays if isinstance(a, np.ndarray) and a.size]


def _overlap(spans, others) -> bool:
    return any(lo < other_hi and other_lo < hi for lo, hi in spans for other_lo, other_hi in others)


def _ordered_before(work, stream) -> bool:
    """Whether `work`, issued earlier, finishes before anything issued now on `stream` starts."""
    if work.stream is stream or work in stream.waited:
        return True
    # the legacy default stream waits for the blocking streams' earlier work, and they for its
    return (work.stream.legacy and stream.blocking) or (stream.legacy and work.stream.blocking)


def launch(reads=(), writes=(), stream=None) -> None:
    """Note work issued now on `stream` (the current one): StreamRace if unfinished work of
    another stream, not ordered before it, writes what it touches or reads what it writes.
    Work issued while a stream is being captured is recorded, not run: not noted."""
    stream = stream or _streams[-1]
    if stream.capturing:
        return
    reads = [a for a in reads if isinstance(a, np.ndarray)]
    writes = [a for a in writes if isinstance(a, np.ndarray)]
    r, w = _bounds(reads), _bounds(writes)
    for work in _pending:
        if _ordered_before(work, stream):
            continue
        if _overlap(w, _bounds(work.reads + work.writes)) or _overlap(r, _bounds(work.writes)):
            raise StreamRace(f"stream {stream.ptr:#x} touches memory that stream "
                             f"{work.stream.ptr:#x} may still be writing or reading, with nothing "
                             "ordering the two")
    if stream.legacy:  # everything blocking issued before is ordered before all that follows
        _pending[:] = [work for work in _pending if not work.stream.blocking]
    _pending.append(_Work(stream, reads, writes))


def _finish(stream=None) -> None:
    """The host waits for `stream` (None: the whole device)."""
    if stream is None:
        _pending.clear()
    elif stream.legacy:  # its work waited for the blocking streams' earlier work
        _pending[:] = [work for work in _pending if not work.stream.blocking]
    else:
        _pending[:] = [work for work in _pending if work.stream is not stream]


class CudaGraph:
    """What Stream.end_capture returns. `replays` and `touches` are set by the recorder (see
    record_forward): the work that the real capture would have recorded, and the arrays it
    reads and writes."""

    replays, touches = None, ((), ())

    def launch(self) -> None:
        reads, writes = self.touches
        launch(reads, writes)
        self.replays()


class Event:
    def __init__(self, *args, **kwargs):
        self.before, self.time = [], None

    def record(self, stream=None) -> None:
        """Everything issued on `stream` so far, and all it waited for, comes before a wait."""
        stream = stream or _streams[-1]
        self.time = time.perf_counter()  # everything here ran when issued
        self.before = [w for w in _pending if w.stream is stream] + list(stream.waited)

    def synchronize(self) -> None:
        _pending[:] = [w for w in _pending if w not in self.before]


class Stream:
    def __init__(self, non_blocking=False, null=False):
        self.ptr, self.capturing = id(self), False
        self.blocking, self.legacy = not non_blocking, null
        self.waited = []  # work of other streams ordered before this one's (wait_event)

    def wait_event(self, event) -> None:
        self.waited += event.before

    def __enter__(self):
        _streams.append(self)
        return self

    def __exit__(self, *exc):
        _streams.pop()

    def begin_capture(self) -> None:
        self.capturing, self.captured = True, []

    def end_capture(self) -> CudaGraph:
        """A graph that re-runs the fake kernels launched during the capture (record_forward
        gives a recorded forward's graph the whole forward instead)."""
        self.capturing = False
        graph, captured = CudaGraph(), self.captured
        graph.replays = lambda: [kernel() for kernel in captured]
        return graph

    def synchronize(self) -> None:
        _finish(self)


_streams = [Stream(null=True)]  # the legacy default stream, current outside any `with stream`


def _widen(w, weight_type):
    """The float32 values of weights stored as kernels.cu's weight type (F32, F16, BF16)."""
    w = np.asarray(w).view(np.ndarray)
    if weight_type == "F16":
        return w.view(np.float16).astype(np.float32)
    if weight_type == "BF16":
        return (w.astype(np.uint32) << 16).view(np.float32)
    return w


class RawModule:
    """kernels.cu, "compiled" into NumPy stand-ins for its kernels, each written from the
    gpt2_numpy/model.py function that specifies it. They take the real kernels' arguments in the
    real order (device arrays, where the kernel gets a pointer: a view starting at that element)
    and write their outputs in place, so gpt2_cupy/fused.py's host side (shapes, argument order,
    chunking, epilogues) runs here as it does on a GPU. The CUDA code itself needs a GPU:
    tests/test_cupy_kernels.py."""

    def __init__(self, code, options=(), name_expressions=()):
        self.names = set(name_expressions)

    def get_function(self, name):
        from gpt2_numpy import model as ref

        base, _, targs = name.partition("<")
        targs = [a.strip() for a in targs.rstrip(">").split(",")] if targs else []
        if base != "layer_norm" and name not in self.names:
            raise KeyError(name)

        def embed(grid, block, args, shared_mem=0):
            wte, wpe, ids, positions, x, d = args
            launch(reads=[wte, wpe, ids, positions], writes=[x])
            W = targs[0]
            x[...] = _widen(wte, W)[np.asarray(ids)] + _widen(wpe, W)[np.asarray(positions)]

        def layer_norm(grid, block, args, shared_mem=0):
            x, g, b, out, d, eps = args
            T = grid[0]
            launch(reads=[x, g, b], writes=[out])
            out[:T] = ref.layer_norm(np.asarray(x[:T]), g, b, float(eps))

        def gemv(grid, block, args, shared_mem=0):
            x, w, bias, residual, y, partial, counters, ln_g, ln_b, n, m, kc, epilogue = args
            T, S, cols = int(targs[1]), -(-int(n) // int(kc)), 32 * (4 if targs[0] == "F32" else 8)
            # what the kernel needs of its launch: kc rows a block (a multiple of 8, at most its
            # 256-float slice of x), a block per (column tile, slice), room for S x T x m
            # partial sums, and the tiles' arrival counters at zero, as the last launch left them
            assert kc % 8 == 0 and 8 <= kc <= 256, kc
            assert tuple(grid) == (-(-int(m) // cols), S), (grid, n, m, kc)
            assert partial.size >= S * T * int(m) and counters.size >= grid[0]
            assert not np.asarray(counters[: grid[0]]).any(), "a gemv counter was left behind"
            launch(reads=[x, w, bias, residual, ln_g, ln_b], writes=[y, partial, counters])
            x = np.asarray(x[:T])
            if epilogue & 4:
                x = ref.layer_norm(x, ln_g, ln_b)
            z = x @ _widen(w, targs[0]) + bias
            if epilogue & 1:
                z = ref.gelu(z)
            if epilogue & 2:
                z = z + residual[:T]
            y[:T] = z

        def lm_head(grid, block, args, shared_mem=0):
            x, wte, logits, d, V = args
            T = int(targs[1])
            launch(reads=[x, wte], writes=[logits])
            logits[:T] = np.asarray(x[:T]) @ _widen(wte, targs[0]).T

        def attention(grid, block, args, shared_mem=0):
            qkv, k_cache, v_cache, positions, out, H, C, scale = args
            launch(reads=[qkv, positions], writes=[k_cache, v_cache, out])
            T, d = grid[1], int(H) * int(targs[0])
            n_past = int(np.asarray(positions)[0])
            q, k, v = (ref.split_heads(np.asarray(qkv)[:, i * d : (i + 1) * d], int(H)) for i in range(3))
            k_cache[:, n_past : n_past + T] = k
            v_cache[:, n_past : n_past + T] = v
            L = n_past + T
            visible = ref.causal_mask(n_past, T, np) if T > 1 else None
            out[...] = ref.merge_heads(ref.attention(q, k_cache[:, :L], v_cache[:, :L], visible))

        kernel = {"embed": embed, "layer_norm": layer_norm, "gemv": gemv, "lm_head": lm_head,
                  "attention": attention}[base]

        def launched(*args, **kwargs):  # run now; in a capture, also kept for the replays
            if _streams[-1].capturing:
                _streams[-1].captured.append(lambda: kernel(*args, **kwargs))
            kernel(*args, **kwargs)
        return launched


class MemoryPool:
    def malloc(self, nbytes):
        raise AssertionError("the fake never allocates through a pool")


class Device:
    def __init__(self, i=0):
        self.id = i

    def synchronize(self) -> None:
        _finish()


SMS = 132  # the fake device's streaming multiprocessors (an H100's)

cuda = types.SimpleNamespace(
    compiler=types.SimpleNamespace(CompileException=RuntimeError),
    Stream=Stream, Event=Event, Device=Device, MemoryPool=MemoryPool,
    get_elapsed_time=lambda start, end: 1e3 * (end.time - start.time),
    get_current_stream=lambda: _streams[-1],
    using_allocator=lambda allocator=None: contextlib.nullcontext(),
    runtime=types.SimpleNamespace(CUDARuntimeError=CUDARuntimeError, getDeviceCount=lambda: 1,
                                  getDevice=lambda: 0,
                                  getDeviceProperties=lambda i: {"name": b"fake GPU (NumPy)",
                                                                 "totalGlobalMem": 0,
                                                                 "multiProcessorCount": SMS},
                                  runtimeGetVersion=lambda: 0, driverGetVersion=lambda: 0),
)


class CuBLAS:
    """graphs.CuBLAS (cuBLAS called with ctypes), here NumPy's matmul."""

    def matmul(self, x, w):
        launch(reads=[x, w])
        return _device(np.matmul(x, w))


def _ours(module_name):
    return module_name == "cupy" or module_name.split(".")[0] == "gpt2_cupy"


@contextlib.contextmanager
def installed():
    """Within this block `import cupy` gives this module and `import gpt2_cupy` a gpt2_cupy
    imported afresh on it (yielded); afterwards both are what they were (a real CuPy too)."""
    saved = {name: sys.modules.pop(name) for name in list(sys.modules) if _ours(name)}
    sys.modules["cupy"] = sys.modules[__name__]
    try:
        import gpt2_cupy
        from gpt2_cupy import graphs

        graphs.CuBLAS = CuBLAS  # static.py's products, through NumPy
        record = graphs.Graph.record

        def record_forward(graph):
            """Graph.record, and the replay that the capture stands for: the same forward on the
            same arrays (inputs, cache), its logits written into the recorded output. Both the
            eager run and each replay read the inputs and write the cache and the logits (the
            fused kernels note their own arrays as well; static.py's NumPy operations do not)."""
            ids, positions, k, v, T = graph.args
            touches = [ids, positions], [k, v]
            with graph.stream:
                launch(*touches)  # the eager forward that record runs first
            logits = record(graph)
            out, forward, args = graph.logits, graph.forward, graph.args

            def replay():
                out[...] = forward(*args)

            graph.graph.replays = replay
            graph.graph.touches = touches[0], touches[1] + [out]
            return logits

        graphs.Graph.record = record_forward  # on this fresh import of graphs.py only
        yield gpt2_cupy
    finally:
        for name in [name for name in sys.modules if _ours(name)]:
            del sys.modules[name]
        sys.modules.update(saved)


if __name__ == "__main__":
    # python tests/fake_cupy.py -m MODULE ARGS: run a module with this fake as CuPy, e.g.
    # python tests/fake_cupy.py -m bench gpu-check --out /tmp/check --sizes 124M ...
    import runpy
    from pathlib import Path

    if sys.argv[1:2] != ["-m"] or len(sys.argv) < 3:
        sys.exit("usage: python tests/fake_cupy.py -m MODULE [ARGS]")
    sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
    sys.argv = [sys.argv[2]] + sys.argv[3:]
    with installed():
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
