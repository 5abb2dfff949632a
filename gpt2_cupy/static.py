"""model.forward with the positions as data: the form a CUDA graph can replay (graphs.py).

A CUDA graph records a sequence of kernel launches once and replays it with one call, always on
the same addresses and sizes. In model.forward the position where the new tokens start, n_past,
is a Python int, and it shapes the work: which cache rows are written (a slice), how many keys
attention reads (L = n_past + T) and which wpe rows are added. Recorded at one n_past, such a
forward would be wrong at the next.

Here the positions are an integer array instead, so that the work has the same shape at every
step and only the array's contents change:
    - keys and values are scattered to rows `positions` of the cache;
    - attention reads the cache's whole capacity C, each query masking the keys after its own
      position (rows not written yet, or stale after a rollback, among them);
    - the position embeddings are gathered with `take`.
The products go through `matmul`, a parameter: a CUDA graph records them through cuBLAS called
directly (graphs.CuBLAS), since CuPy's own `@` refuses to run while a graph is recorded.
Everything else is model.py's own functions, and the logits equal model.forward's up to float
rounding (tests/test_cupy.py checks it). This is the unfused forward; fused.py is the same
forward in five kernels per layer.
"""
import math

from gpt2_numpy.backend import namespace_of
from gpt2_numpy.model import gelu, layer_norm, merge_heads, softmax, split_heads


def static_forward(params: dict, ids, positions, k, v, n_head: int, n_logits: int, matmul):
    """Feed tokens `ids` at absolute `positions`; return logits for the last n_logits rows.

    ids, positions: [T] integer arrays of the weights' backend; k, v: a KVCache's arrays
    [n_layer, H, C, D]. matmul(x, w): x @ w, batched too. The caller keeps the cache's length.
    Returns [n_logits, V].
    """
    wte, wpe = params["wte"], params["wpe"]
    xp = namespace_of(wte)
    C = k.shape[2]
    # Where this differs from model.py, the line says why; model.py's layer_norm, gelu,
    # split_heads, merge_heads and softmax are used as they are.

    def linear(x, w, b):  # model.linear, through `matmul`: CuPy's @ refuses to run in a capture
        return matmul(x, w) + b

    # model.forward slices wpe[n_past : n_past + T]: a slice's start would be fixed in the graph
    x = xp.take(wte, ids, axis=0) + xp.take(wpe, positions, axis=0)  # [T, d]
    # model.causal_mask covers L = n_past + T keys, a shape that changes every step; here all C
    # keys, key row j visible to a query at position p iff j <= p (rows beyond the newest token
    # are never seen, whatever they hold)
    visible = xp.reshape(xp.arange(C), (1, C)) <= xp.reshape(positions, (-1, 1))  # [T, C]
    for i, block in enumerate(params["blocks"]):  # model.transformer_block
        attn, mlp = block["attn"], block["mlp"]
        h = layer_norm(x, **block["ln_1"])
        heads = split_heads(linear(h, **attn["c_attn"]), 3 * n_head)  # as model.py: [3H, T, D]
        q, k_new, v_new = heads[:n_head], heads[n_head : 2 * n_head], heads[2 * n_head :]
        # model.py writes the slice n_past:L; a scatter writes where the data says
        k[i][:, positions, :] = k_new
        v[i][:, positions, :] = v_new
        # model.attention over all C rows of the cache, its products through `matmul`
        D = q.shape[-1]
        scores = matmul(q * (1.0 / math.sqrt(D)), xp.permute_dims(k[i], (0, 2, 1)))  # [H, T, C]
        scores = xp.where(visible, scores, xp.full_like(scores, -1e10))
        out = matmul(softmax(scores), v[i])  # [H, T, C] @ [H, C, D] -> [H, T, D]
        x = x + linear(merge_heads(out), **attn["c_proj"])
        # model.mlp, through `matmul`
        x = x + linear(gelu(linear(layer_norm(x, **block["ln_2"]), **mlp["c_fc"])), **mlp["c_proj"])
    T = x.shape[0]
    x = layer_norm(x[T - n_logits :, :], **params["ln_f"])  # [n_logits, d]
    return matmul(x, wte.T)  # model.lm_head, through `matmul`: [n_logits, V]
