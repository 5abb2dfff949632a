"""One GPT-2 forward in five kernel launches per layer: the fused kernels of kernels.cu.

gpt2_numpy/model.py on CuPy arrays launches ~50 small kernels per layer (a layer norm alone is
about ten), and a decoding step is bound by launching them, not by reading the weights. Here a
layer is exactly these launches, each the named model.py functions:

    qkv = layer_norm(x) @ c_attn.w + c_attn.b          gemv (layer norm on the way in)
    a = attention over the cache (writes k, v)         causal_self_attention
    x = x + a @ attn.c_proj.w + c_proj.b               gemv (residual add on the way out)
    f = gelu(layer_norm(x) @ c_fc.w + c_fc.b)          gemv (layer norm in, gelu out)
    x = x + f @ mlp.c_proj.w + c_proj.b                gemv (residual add out)

plus one embedding lookup before the layers and a layer norm and the tied LM head after them.
Like gpt2_cupy/static.py, the forward takes the positions as a device array, so that one CUDA
graph (graphs.py) replays it at every step.

Weight matrices (and wte, wpe) can be stored as float16 or bfloat16 (`convert_weights`): they are
widened to float32 as they are read, and everything else (activations, the residual stream, the
KV cache, biases, layer-norm parameters, every sum) stays float32.
"""
import math
from pathlib import Path

import cupy as cp
import numpy as np

from gpt2_numpy.errors import GPT2Error

SOURCE = Path(__file__).with_name("kernels.cu")
WEIGHT_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
MAX_T = 16  # gemv and lm_head are compiled for 1..MAX_T rows; more rows run in chunks of MAX_T
HEAD_SIZES = (8, 16, 32, 64)  # D, for which the attention kernel is compiled (official: 64)
WAVES, MIN_KC = 2, 16  # gemv's split-K: blocks per SM wanted, fewest rows of w per block
ADD_BIAS, GELU, ADD_RESIDUAL, LN_INPUT = 0, 1, 2, 4  # gemv's flags (kernels.cu)
MATRICES = (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj"))


def split_k_rows(n: int, m: int, cols: int, sms: int) -> int:
    """Rows of w [n, m] one gemv block reads (kc, a multiple of 8 in MIN_KC..256; 256 is the
    kernel's slice of x in shared memory): the most that still gives ceil(m / cols) column
    tiles x S = ceil(n / kc) row slices >= WAVES blocks per SM, so that even a [d, d] matrix
    keeps the whole GPU reading. S does not depend on T, the number of rows of x: a token's
    logits are the same bits whichever forward (a step, a verify, a chunk) computed them. On
    132 SMs the official shapes get S = 7..96 and two waves or more, but where MIN_KC binds:
    the [d, d] matrices of 124M and 355M in half precision, 1.1 and 1.9 waves."""
    tiles = -(-m // cols)
    splits = -(-WAVES * sms // tiles)  # row slices wanted
    return max(MIN_KC, min(256, n // splits // 8 * 8))


def map_matrices(params: dict, fn) -> dict:
    """The parameter tree with fn applied to wte, wpe and each block's four weight matrices
    (the arrays stored in half precision); the rest shared, not copied."""
    out = dict(params, wte=fn(params["wte"]), wpe=fn(params["wpe"]), blocks=[])
    for block in params["blocks"]:
        block = {**block, "attn": dict(block["attn"]), "mlp": dict(block["mlp"])}
        for part, name in MATRICES:
            block[part][name] = dict(block[part][name], w=fn(block[part][name]["w"]))
        out["blocks"].append(block)
    return out


def convert_weights(params: dict, dtype: str) -> dict:
    """The parameter tree with its matrices stored as `dtype` (float16 / bfloat16 as uint16 bit
    patterns, which the kernels widen; float32 as it is). Biases and layer-norm parameters stay
    float32. bfloat16 rounds to nearest even."""
    if dtype == "float32":
        return params

    def narrow(a):
        if dtype == "float16":
            return a.astype(cp.float16).view(cp.uint16)
        bits = a.view(cp.uint32).astype(cp.uint64)  # round to nearest, ties to even
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(cp.uint16)
    return map_matrices(params, narrow)


def widen_weights(params: dict, dtype: str) -> dict:
    """float32 copies of convert_weights' narrowed arrays (the values the kernels compute with)."""
    if dtype == "float32":
        return params

    def widen(a):
        if dtype == "float16":
            return a.view(cp.float16).astype(cp.float32)
        return (a.astype(cp.uint32) << 16).view(cp.float32)
    return map_matrices(params, widen)


def check_layout(params: dict, per16: int) -> None:
    """GPT2Error unless every array the kernels read is C-contiguous (they index it as
    row-major) and every weight matrix starts on a 16-byte boundary with rows of whole 16-byte
    loads (gemv and lm_head read it 16 bytes at a time): arrays made by the loader are, a slice
    or a view of another array may not be."""
    def walk(node, name):
        if isinstance(node, dict):
            for key, child in node.items():
                walk(child, f"{name}.{key}" if name else key)
        elif isinstance(node, list):
            for i, child in enumerate(node):
                walk(child, f"{name}.{i}")
        elif not node.flags.c_contiguous:
            raise GPT2Error(f"the fused kernels need contiguous weights; {name} is not")
        elif node.ndim == 2 and (node.data.ptr % 16 or node.shape[1] % per16):
            raise GPT2Error(f"the fused kernels need {name} on a 16-byte boundary with a "
                            f"multiple of {per16} columns")
    walk(params, "")


class Kernels:
    """kernels.cu compiled for one weight dtype, with a launcher per kernel."""

    def __init__(self, dtype: str = "float32"):
        self.W = WEIGHT_DTYPES[dtype]
        self.per16 = 4 if dtype == "float32" else 8  # weights per 16-byte load
        self.cols = 32 * self.per16  # columns of one gemv block (a column tile)
        self.sms = cp.cuda.runtime.getDeviceProperties(cp.cuda.runtime.getDevice())[
            "multiProcessorCount"]
        names = ([f"embed<{self.W}>", "layer_norm"] + [f"attention<{D}>" for D in HEAD_SIZES]
                 + [f"gemv<{self.W}, {T}>" for T in range(1, MAX_T + 1)]
                 + [f"lm_head<{self.W}, {T}>" for T in range(1, MAX_T + 1)])
        self.module = cp.RawModule(code=SOURCE.read_text(), options=("-std=c++17",),
                                   name_expressions=names)
        self.functions = {name: self.module.get_function(name) for name in names}

    def split_rows(self, n: int, m: int) -> int:
        """gemv's kc for w [n, m] on this GPU (split_k_rows)."""
        return split_k_rows(n, m, self.cols, self.sms)

    def embed(self, wte, wpe, ids, positions, x):
        """x [T, d] = wte[ids] + wpe[positions]"""
        T, d = x.shape
        self.functions[f"embed<{self.W}>"]((T,), (256,), (wte, wpe, ids, positions, x, np.int32(d)))

    def layer_norm(self, x, g, b, out, eps=1e-5):
        """out [T, d] = layer_norm(x [T, d])"""
        T, d = x.shape
        self.functions["layer_norm"]((T,), (256,), (x, g, b, out, np.int32(d), np.float32(eps)))

    def gemv(self, x, w, b, out, workspace, epilogue=ADD_BIAS, ln=None):
        """out [T, m] = x [T, n] @ w [n, m] + b, then gelu (GELU) or + out (ADD_RESIDUAL);
        ln = {g, b}: layer_norm(x) @ w instead of x @ w."""
        T, n = x.shape
        m = w.shape[1]
        if ln is not None:
            epilogue |= LN_INPUT
        g, beta = (ln["g"], ln["b"]) if ln is not None else (b, b)  # unread without LN_INPUT
        kc = self.split_rows(n, m)
        grid = (-(-m // self.cols), -(-n // kc))
        for start in range(0, T, MAX_T):
            rows = min(MAX_T, T - start)
            workspace.check(grid[1] * rows * m, grid[0])
            self.functions[f"gemv<{self.W}, {rows}>"](
                grid, (256,), (x[start:], w, b, out[start:], out[start:], workspace.partial,
                               workspace.counters, g, beta, np.int32(n), np.int32(m),
                               np.int32(kc), np.int32(epilogue)))

    def attention(self, qkv, k_cache, v_cache, positions, out):
        """out [T, d] = attention of T new queries over the cache (this call's keys included),
        after writing this call's keys and values to rows `positions` of k_cache, v_cache [H, C, D]"""
        T = qkv.shape[0]
        H, C, D = k_cache.shape
        self.functions[f"attention<{D}>"](
            (H, T), (256,), (qkv, k_cache, v_cache, positions, out, np.int32(H), np.int32(C),
                             np.float32(1.0 / math.sqrt(D))))

    def lm_head(self, x, wte, logits):
        """logits [T, V] = x [T, d] @ wte.T"""
        T, d = x.shape
        V = wte.shape[0]
        for start in range(0, T, MAX_T):
            rows = min(MAX_T, T - start)
            self.functions[f"lm_head<{self.W}, {rows}>"](
                (-(-V // 8),), (256,), (x[start:], wte, logits[start:], np.int32(d), np.int32(V)))


class Workspace:
    """gemv's scratch: partial sums [S, T, m] and one arrival counter per column tile (zero
    between launches: the last block of a tile resets it). One per model, shared by all its
    forwards, which therefore must never overlap (graphs.py replays them on one stream): a
    counter that another launch is still counting makes the last block sum too early."""

    def __init__(self, hparams: dict, kernels: "Kernels"):
        d = hparams["n_embd"]
        shapes = [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)]
        floats = max(-(-n // kernels.split_rows(n, m)) * MAX_T * m for n, m in shapes)
        self.partial = cp.empty(floats, dtype=cp.float32)
        self.counters = cp.zeros(-(-4 * d // kernels.cols), dtype=cp.uint32)

    def check(self, floats: int, tiles: int) -> None:
        if floats > self.partial.size or tiles > self.counters.size:
            raise ValueError(f"gemv workspace too small ({floats} > {self.partial.size} or "
                             f"{tiles} > {self.counters.size})")


class FusedForward:
    """forward(ids, positions, k, v, n_logits) for one model, in the fused kernels.

    params: the parameter tree, its matrices as `dtype` (convert_weights).
    """

    def __init__(self, params: dict, hparams: dict, dtype: str = "float32"):
        d, H = hparams["n_embd"], hparams["n_head"]
        if d % H or d // H not in HEAD_SIZES or d % 8:
            raise ValueError(f"the fused kernels need a head size in {HEAD_SIZES} and n_embd % 8 "
                             f"== 0 (got n_embd={d}, n_head={H})")
        self.params, self.hparams = params, hparams
        self.kernels = Kernels(dtype)
        check_layout(params, self.kernels.per16)
        self.workspace = Workspace(hparams, self.kernels)

    def __call__(self, ids, positions, k, v, n_logits: int):
        """Feed tokens `ids` at `positions` (consecutive; [T] int64 device arrays) into the
        cache k, v [n_layer, H, C, D]; return logits [n_logits, V] of the last n_logits rows
        (None for n_logits = 0, a prefill)."""
        kern, ws, p = self.kernels, self.workspace, self.params
        T, d = ids.shape[0], self.hparams["n_embd"]
        if not 0 <= n_logits <= T:  # the final layer norm would read rows before x
            raise GPT2Error(f"n_logits must be in 0..{T} (the new tokens), got {n_logits}")
        x = cp.empty((T, d), dtype=cp.float32)  # the residual stream
        qkv = cp.empty((T, 3 * d), dtype=cp.float32)
        a = cp.empty((T, d), dtype=cp.float32)
        f = cp.empty((T, 4 * d), dtype=cp.float32)
        kern.embed(p["wte"], p["wpe"], ids, positions, x)
        for i, block in enumerate(p["blocks"]):
            attn, mlp = block["attn"], block["mlp"]
            kern.gemv(x, attn["c_attn"]["w"], attn["c_attn"]["b"], qkv, ws, ln=block["ln_1"])
            kern.attention(qkv, k[i], v[i], positions, a)
            kern.gemv(a, attn["c_proj"]["w"], attn["c_proj"]["b"], x, ws, ADD_RESIDUAL)
            kern.gemv(x, mlp["c_fc"]["w"], mlp["c_fc"]["b"], f, ws, GELU, ln=block["ln_2"])
            kern.gemv(f, mlp["c_proj"]["w"], mlp["c_proj"]["b"], x, ws, ADD_RESIDUAL)
        if n_logits == 0:
            return None
        last = cp.empty((n_logits, d), dtype=cp.float32)
        kern.layer_norm(x[T - n_logits :], p["ln_f"]["g"], p["ln_f"]["b"], last)
        logits = cp.empty((n_logits, p["wte"].shape[0]), dtype=cp.float32)
        kern.lm_head(last, p["wte"], logits)
        return logits
