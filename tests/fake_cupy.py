"""A stand-in for CuPy, over NumPy, so that the GPU code's bookkeeping runs on any machine.

gpt2_cupy adds no arithmetic of its own: it is gpt2_numpy's forward on CuPy arrays, plus
graphs.py, which decides which forward runs as which CUDA graph (one per cache and T, chunks of
16 for long catch-ups, caches handed out again with their graphs, warm_up). That deciding is
plain Python, and a machine without a GPU can check it if "CuPy" is NumPy and a "CUDA graph" is
a recording that re-runs the forward it recorded, writing into the same output array as a real
replay writes into the same addresses. See `installed`.

What it checks of CUDA: a host transfer inside a capture raises, as CUDA refuses it. What it
cannot check: anything else CUDA does (what else a capture refuses, streams, memory pools,
cuBLAS, float32 rounding on the device), nor a device array used as a host one (NumPy accepts
these arrays, which are NumPy's; CuPy refuses np.asarray of its own). tests/test_cupy.py runs
the same tests on a real GPU when there is one.
"""
import contextlib
import sys
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
        self[...] = host

    def get(self) -> np.ndarray:
        _no_host_transfer_while_capturing()
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


def asnumpy(x) -> np.ndarray:
    return x.get() if isinstance(x, ndarray) else np.asarray(x)


class CUDARuntimeError(RuntimeError):
    pass


def _no_host_transfer_while_capturing():
    if any(stream.capturing for stream in _streams):
        raise CUDARuntimeError("cudaErrorStreamCaptureUnsupported: a host transfer in a capture")


class CudaGraph:
    """What Stream.end_capture returns. `replays` is set by the recorder (see record_forward):
    the work that the real capture would have recorded."""

    replays = None

    def launch(self) -> None:
        self.replays()


class Stream:
    def __init__(self, non_blocking=False):
        self.ptr, self.capturing = id(self), False

    def __enter__(self):
        _streams.append(self)
        return self

    def __exit__(self, *exc):
        _streams.pop()

    def begin_capture(self) -> None:
        self.capturing = True

    def end_capture(self) -> CudaGraph:
        self.capturing = False
        return CudaGraph()

    def synchronize(self) -> None:
        pass


_streams = [Stream()]


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
            W = targs[0]
            x[...] = _widen(wte, W)[np.asarray(ids)] + _widen(wpe, W)[np.asarray(positions)]

        def layer_norm(grid, block, args, shared_mem=0):
            x, g, b, out, d, eps = args
            T = grid[0]
            out[:T] = ref.layer_norm(np.asarray(x[:T]), g, b, float(eps))

        def gemv(grid, block, args, shared_mem=0):
            x, w, bias, residual, y, partial, counters, ln_g, ln_b, n, m, kc, epilogue = args
            T = int(targs[1])
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
            logits[:T] = np.asarray(x[:T]) @ _widen(wte, targs[0]).T

        def attention(grid, block, args, shared_mem=0):
            qkv, k_cache, v_cache, positions, out, H, C, scale = args
            T, d = grid[1], int(H) * int(targs[0])
            n_past = int(np.asarray(positions)[0])
            q, k, v = (ref.split_heads(np.asarray(qkv)[:, i * d : (i + 1) * d], int(H)) for i in range(3))
            k_cache[:, n_past : n_past + T] = k
            v_cache[:, n_past : n_past + T] = v
            L = n_past + T
            visible = ref.causal_mask(n_past, T, np) if T > 1 else None
            out[...] = ref.merge_heads(ref.attention(q, k_cache[:, :L], v_cache[:, :L], visible))

        return {"embed": embed, "layer_norm": layer_norm, "gemv": gemv, "lm_head": lm_head,
                "attention": attention}[base]


class MemoryPool:
    def malloc(self, nbytes):
        raise AssertionError("the fake never allocates through a pool")


cuda = types.SimpleNamespace(
    compiler=types.SimpleNamespace(CompileException=RuntimeError),
    Stream=Stream, MemoryPool=MemoryPool, get_current_stream=lambda: _streams[-1],
    using_allocator=lambda allocator=None: contextlib.nullcontext(),
    runtime=types.SimpleNamespace(CUDARuntimeError=CUDARuntimeError, getDeviceCount=lambda: 1,
                                  getDeviceProperties=lambda i: {"name": b"fake GPU (NumPy)",
                                                                 "totalGlobalMem": 0},
                                  runtimeGetVersion=lambda: 0, driverGetVersion=lambda: 0),
)


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

        # static.py's products go through cuBLAS called with ctypes; here, through NumPy
        graphs._cublas = types.SimpleNamespace(matmul=lambda x, w: _device(np.matmul(x, w)))
        record = graphs.Graph.record

        def record_forward(graph):
            """Graph.record, and the replay that the capture stands for: the same forward on the
            same arrays (inputs, cache), its logits written into the recorded output."""
            logits = record(graph)
            out, forward, args = graph.logits, graph.forward, graph.args

            def replay():
                out[...] = forward(*args)

            graph.graph.replays = replay
            return logits

        graphs.Graph.record = record_forward  # on this fresh import of graphs.py only
        yield gpt2_cupy
    finally:
        for name in [name for name in sys.modules if _ours(name)]:
            del sys.modules[name]
        sys.modules.update(saved)
