"""CUDA graphs: a decoding step as one GPU launch instead of ~50 per layer.

Why. A forward is a chain of kernel launches (~50 per layer for gpt2_numpy/model.py's
functions, five for fused.py's), and each launch costs the host microseconds of Python, CuPy and
driver time, often more than the kernel itself runs. A CUDA graph records those launches once
and replays them with one call (docs/gpu.md times both ways).

How. A graph replays fixed work on fixed addresses, so it is recorded from a forward whose
positions are an array: fused.py's (five kernels per layer) or, without the fused kernels,
static.py's (model.py's functions; read that file first). One graph
per (cache, T), since a cache's arrays are baked in; it computes logits for all T rows and a
caller asking for fewer gets the last n_logits (the LM head streams wte once however few rows
it has, so one graph serves a verify step, a draft step and a catch-up of the same T):
    - the first forward of that kind runs eagerly (that is its result; it also compiles the
      kernels and fills the graph's private memory pool), then the same forward is recorded;
    - later ones copy the token ids and positions into the graph's input array and launch it.
A graph's scratch memory comes from a pool of its own, so nothing else can be handed memory the
graph will write into on its next replay. CuPy refuses to call cuBLAS while a stream is being
recorded (cuBLAS itself allows it), so static.py's products go through `CuBLAS.matmul`, the
same product through cuBLAS called directly. A forward over more than
GRAPH_MAX_T new tokens with logits (a catch-up after a long plain stretch) runs as chunks of
GRAPH_MAX_T, each a graph launch, up to CHUNKED_MAX_T, beyond which the eager forward's bigger
kernels should win. Longer forwards, and prefills (no logits, whatever their length), run eagerly:
they happen once per call.

Recording costs about two eager forwards, and the decoders make a new cache per call. So `new_cache` hands out the arrays of a dropped cache of
the same capacity again, with their graphs: a second call of the same length replays from its
first step. At most SPARE_CACHES dropped caches are kept per model, whatever their capacities;
only caches made by `new_cache` are graphed (their graphs go when the cache's arrays do), any
other runs eagerly. `warm_up(capacity)` records every graph of one capacity up front, so that
no timed step pays for a recording: an adaptive decoder, whose catch-ups come in any length,
would otherwise record in the middle of a run and count it as the cost of drafting.
"""
import ctypes
import warnings
import weakref

import cupy as cp
import numpy as np

from gpt2_numpy.errors import GPT2Error
from gpt2_numpy.load import GPT2
from gpt2_numpy.model import KVCache

from .fused import FusedForward, convert_weights
from .static import static_forward

GRAPH_MAX_T = 16  # one graph per T up to this (a verify step over K + 1 <= 16 tokens is one)
CHUNKED_MAX_T = 8 * GRAPH_MAX_T  # up to this, forwards with logits run as chunks of graphs
SPARE_CACHES = 4  # dropped caches kept per model for reuse, with their graphs
# The fused kernels are used unless a model is made with fused=False (they fall back to the
# unfused forward, with a warning, where they do not compile).
FUSED_BY_DEFAULT = True


class CuBLAS:
    """Row-major x @ w (batched or not) through cuBLAS's sgemm, called with ctypes.

    cuBLAS is column-major: a row-major [r, c] matrix with strides (s, 1) is, to it, the
    column-major [c, r] matrix (its transpose) with leading dimension s, and a transposed view
    (strides (1, s)) is the column-major [r, c] matrix itself. So y = x @ w is computed as
    y^T = w^T x^T, with no copy of either operand whatever its layout.
    """

    def __init__(self):
        cp.ones((2, 2), cp.float32) @ cp.ones((2, 2), cp.float32)  # CuPy loads libcublas
        paths = sorted({line.split()[-1] for line in open("/proc/self/maps")
                        if "libcublas.so" in line and "libcublasLt" not in line})
        if not paths:
            raise cp.cuda.runtime.CUDARuntimeError(999)  # handled by the caller: run eagerly
        self.lib = ctypes.CDLL(paths[0])
        self.handle = ctypes.c_void_p()
        self.check(self.lib.cublasCreate_v2(ctypes.byref(self.handle)))
        self.workspace = cp.empty(32 * 2**20, dtype=cp.uint8)  # so that cuBLAS never allocates
        self.check(self.lib.cublasSetWorkspace_v2(self.handle, ctypes.c_void_p(self.workspace.data.ptr),
                                                  ctypes.c_size_t(self.workspace.nbytes)))
        self.one, self.zero = ctypes.c_float(1.0), ctypes.c_float(0.0)

    @staticmethod
    def check(status):
        if status != 0:
            raise RuntimeError(f"cuBLAS error {status}")

    @staticmethod
    def operand(a):
        """(transpose?, leading dimension) of row-major 2-D matrices a[..., r, c] for cuBLAS,
        as the column-major matrix a^T."""
        s_r, s_c = (s // a.itemsize for s in a.strides[-2:])
        if s_c == 1 or a.shape[-1] == 1:
            return 0, max(s_r, a.shape[-1], 1)  # CUBLAS_OP_N on a^T, stored with ld s_r
        if s_r == 1 or a.shape[-2] == 1:
            return 1, max(s_c, a.shape[-2], 1)  # CUBLAS_OP_T on a, stored with ld s_c
        raise ValueError("cuBLAS needs one unit stride per matrix")

    def matmul(self, x, w):
        """x [..., T, n] @ w [..., n, m] -> [..., T, m] (equal leading batch shapes)"""
        T, n, m = x.shape[-2], x.shape[-1], w.shape[-1]
        batch = x.shape[:-2]
        y = cp.empty(batch + (T, m), dtype=cp.float32)
        op_w, ld_w = self.operand(w)
        op_x, ld_x = self.operand(x)
        count = int(np.prod(batch)) if batch else 1
        step = lambda a: (a.strides[0] // a.itemsize) if batch else 0  # noqa: E731
        self.check(self.lib.cublasSetStream_v2(self.handle,
                                               ctypes.c_void_p(cp.cuda.get_current_stream().ptr)))
        self.check(self.lib.cublasSgemmStridedBatched(
            self.handle, op_w, op_x, m, T, n, ctypes.byref(self.one),
            ctypes.c_void_p(w.data.ptr), ld_w, ctypes.c_longlong(step(w)),
            ctypes.c_void_p(x.data.ptr), ld_x, ctypes.c_longlong(step(x)),
            ctypes.byref(self.zero), ctypes.c_void_p(y.data.ptr), m, ctypes.c_longlong(T * m),
            count))
        return y


class Graph:
    """One recorded forward over T new tokens on one cache, with logits for all T rows,
    recorded and replayed on its model's stream."""

    def __init__(self, model, cache, T: int):
        self.stream = model.stream
        self.pool = cp.cuda.MemoryPool()  # the graph's scratch memory, for it alone
        self.inputs = cp.zeros((2, T), dtype=cp.int64)  # [ids; positions], rewritten per launch
        self.forward = model.positional_forward
        self.args = (self.inputs[0], self.inputs[1], cache.k, cache.v, T)
        self.graph = self.logits = None

    def __call__(self, ids, n_past: int, n_logits: int):
        """Feed ids at positions n_past.. and return the logits of the last n_logits."""
        T = len(ids)
        with self.stream:
            self.inputs.set(np.array([ids, range(n_past, n_past + T)], dtype=np.int64))
            if self.graph is None:
                return self.record()[T - n_logits :]
            self.graph.launch()
            return self.logits[T - n_logits :].copy()  # the next launch rewrites self.logits

    def record(self):
        with cp.cuda.using_allocator(self.pool.malloc):
            logits = self.forward(*self.args)  # run: this call's result
            self.stream.begin_capture()
            try:
                self.logits = self.forward(*self.args)  # recorded, not run
            finally:
                self.graph = self.stream.end_capture()
        return logits


def check_token_ids(ids, n_vocab: int) -> None:
    """GPT2Error unless every id is in 0..n_vocab - 1 (the embedding kernels and CuPy's `take`
    would read another row, or past the table, without a word)."""
    if len(ids) and not 0 <= min(ids) <= max(ids) < n_vocab:
        bad = next(i for i in ids if not 0 <= i < n_vocab)
        raise GPT2Error(f"token id {bad} is outside the vocabulary (0..{n_vocab - 1})")


class GraphedGPT2(GPT2):
    """A GPT2 whose forwards over up to GRAPH_MAX_T new tokens replay CUDA graphs. Used exactly
    like GPT2 (`model(ids, cache, n_logits)`), with the same logits up to float rounding.

    params: float32, as loaded. dtype: how the weight matrices are stored on the device
    ("float32", "float16", "bfloat16"; half precision needs the fused kernels). fused: run the
    fused kernels (fused.py; None: FUSED_BY_DEFAULT, or yes for half precision).
    """

    def __init__(self, hparams: dict, params: dict, tokenizer=None, name: str = "gpt2",
                 graphs: bool = True, fused: bool = None, dtype: str = "float32"):
        if dtype not in ("float32", "float16", "bfloat16"):
            raise GPT2Error(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
        fused = (FUSED_BY_DEFAULT or dtype != "float32") if fused is None else fused
        if dtype != "float32" and not fused:
            raise GPT2Error(f"{dtype} weights need the fused kernels (fused=True)")
        params = convert_weights(params, dtype)
        super().__init__(hparams, params, tokenizer, name)
        self.dtype = dtype
        self.fused = None
        if fused:
            try:
                self.fused = FusedForward(params, hparams, dtype)
            except Exception as e:  # no compiler, an unsupported GPU, a shape it does not cover
                if dtype != "float32":
                    raise GPT2Error(f"{dtype} weights need the fused kernels, which are "
                                    f"unavailable here ({type(e).__name__}: {e})") from None
                warnings.warn(f"fused kernels unavailable ({type(e).__name__}: {e}); running "
                              "the unfused forward", RuntimeWarning)
        self.use_graphs = graphs  # False: every forward eagerly
        # Every graph of this model records and replays on this one stream, so its replays run
        # one after another: they share the caches' rows and the fused kernels' workspace, and a
        # forward in chunks is two replays in a row. (Capture needs a stream other than the
        # legacy default one; a blocking stream stays ordered with the default stream's work:
        # the eager forwards and the decoders' device -> host copies.)
        self.stream = cp.cuda.Stream(non_blocking=False)
        self.cublas = None  # CuBLAS, made on first use (static.py's products inside a graph)
        self.graphs = {}  # (address of cache.k, T) -> Graph
        self.spare = []  # (k, v) of dropped caches, oldest first
        self.handed_out = weakref.WeakSet()  # live caches made by new_cache: the graphed ones

    def positional_forward(self, ids, positions, k, v, n_logits: int):
        """The forward a graph records: ids, positions [T] device arrays, k, v a cache's arrays;
        logits [n_logits, V]. The fused kernels, else static.py's forward through cuBLAS."""
        if self.fused:
            return self.fused(ids, positions, k, v, n_logits)
        return static_forward(self.params, ids, positions, k, v, self.hparams["n_head"], n_logits,
                              self.matmul)

    def matmul(self, x, w):
        """x @ w through cuBLAS called directly (this model's CuBLAS, made on first use)."""
        self.cublas = self.cublas or CuBLAS()
        return self.cublas.matmul(x, w)

    def eager(self, ids, cache, n_logits):
        """A forward without a graph: model.forward, or the fused kernels launched one by one."""
        if not self.fused:
            return GPT2.__call__(self, ids, cache, n_logits)
        n_past, T = cache.length, len(ids)
        cache.check_room(T)
        n_logits = T if n_logits is None else n_logits
        ids = cp.asarray(np.asarray(ids, dtype=np.int64))
        positions = cp.arange(n_past, n_past + T, dtype=cp.int64)
        logits = self.fused(ids, positions, cache.k, cache.v, n_logits)
        cache.length = n_past + T
        return logits

    def new_cache(self, capacity: int = None) -> KVCache:
        """An empty cache; the arrays of a dropped one of the same capacity if there is one."""
        capacity = capacity or self.n_ctx
        reusable = [i for i, (k, _) in enumerate(self.spare) if k.shape[2] == capacity]
        if not reusable:  # float32 whatever the weights' dtype
            cache = KVCache(self.hparams, capacity, cp, cp.float32)
        else:
            cache = KVCache.__new__(KVCache)  # the same arrays, length 0: as good as new
            cache.k, cache.v = self.spare.pop(reusable[-1])
            cache.capacity, cache.length = capacity, 0
        self.handed_out.add(cache)
        weakref.finalize(cache, self.release, cache.k, cache.v)
        return cache

    def release(self, k, v) -> None:
        """Called when a cache is dropped: keep its arrays (and graphs) for the next new_cache."""
        self.spare.append((k, v))
        if len(self.spare) > SPARE_CACHES:
            old, _ = self.spare.pop(0)
            for key in [key for key in self.graphs if key[0] == old.data.ptr]:
                del self.graphs[key]  # the graphs held the last references to its memory

    def warm_up(self, capacity: int = None) -> None:
        """Record now every graph a decoder can replay on caches of this capacity (the decoders
        make theirs with len(prompt) + n_new - 1): one per T = 1..GRAPH_MAX_T. The cache goes
        back to the spares with its graphs, and the next new_cache(capacity) hands it out.
        (Recording runs each forward eagerly first: that compiles the kernels as well.)"""
        cache = self.new_cache(capacity)
        for T in range(1, min(GRAPH_MAX_T, cache.capacity) + 1):
            cache.rollback(0)
            self([0] * T, cache, n_logits=T)  # any ids: the rows it writes count as stale

    def __call__(self, ids, cache, n_logits=1, positions=None, visible=None):
        check_token_ids(ids, self.hparams["n_vocab"])  # on the host: a device lookup never checks
        if positions is not None or visible is not None:  # a token tree: the fused kernels and
            # graphs have no tree mask, so model.forward runs it, on float32 weights only
            if self.dtype != "float32":
                raise GPT2Error("token trees run the unfused forward: they need float32 weights")
            return GPT2.__call__(self, ids, cache, n_logits, positions, visible)
        T = len(ids)
        n_logits = T if n_logits is None else n_logits
        if not 0 <= n_logits <= T:
            raise GPT2Error(f"n_logits must be in 0..{T} (the new tokens), got {n_logits}")
        if (not self.use_graphs or cache not in self.handed_out or not 0 < T <= CHUNKED_MAX_T
                or not 0 < n_logits <= T or cache.length + T > cache.capacity):
            return self.eager(ids, cache, n_logits)  # (and its errors)
        if T <= GRAPH_MAX_T:
            return self.replay(ids, cache, n_logits)
        # Longer, with logits (a draft catching up after a long plain stretch): chunks of
        # GRAPH_MAX_T, each a graph launch. The cache makes it exact (each chunk attends to the
        # ones before), and the last n_logits rows of the whole are the last rows of the chunks.
        out = []
        for start in range(0, T, GRAPH_MAX_T):
            chunk = ids[start : start + GRAPH_MAX_T]
            wanted = max(0, min(len(chunk), start + len(chunk) - (T - n_logits)))
            logits = self.replay(chunk, cache, wanted)
            if wanted:
                out.append(logits)
        return cp.concatenate(out) if len(out) > 1 else out[0]

    def hidden_states(self, ids, cache, n_rows=1, positions=None, visible=None):
        """model.hidden_states, eagerly and unfused (what Medusa heads read): float32 only."""
        check_token_ids(ids, self.hparams["n_vocab"])
        if self.dtype != "float32":  # model.hidden_states reads float32 weights only
            raise GPT2Error("hidden states (Medusa heads) come from the unfused forward: they "
                            "need float32 weights")
        return GPT2.hidden_states(self, ids, cache, n_rows, positions, visible)

    def replay(self, ids, cache, n_logits: int):
        """Feed T <= GRAPH_MAX_T tokens through the graph of (cache, T), recorded on first use;
        the logits of the last n_logits rows (None for 0)."""
        T, n_past = len(ids), cache.length
        if not self.use_graphs:  # a recording failed during this forward's earlier chunks
            return self.eager(ids, cache, n_logits)
        key = (cache.k.data.ptr, T)
        if key not in self.graphs:
            self.graphs[key] = Graph(self, cache, T)
        try:
            logits = self.graphs[key](ids, n_past, n_logits)
        except (cp.cuda.runtime.CUDARuntimeError, OSError, RuntimeError) as e:  # no capture here
            warnings.warn(f"CUDA graphs unavailable ({e}); running eagerly", RuntimeWarning)
            self.use_graphs = False
            return self.eager(ids, cache, n_logits)
        cache.length = n_past + T
        return logits if n_logits else None
