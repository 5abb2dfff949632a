"""model.forward with the positions as data: the form a CUDA graph can replay (gpt2_cupy/graphs.py).

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
Everything else is model.py's own functions, and the logits equal model.forward's up to float
rounding (tests/test_model.py checks it on NumPy, tests/test_cupy.py on a GPU). Reading all C
keys instead of L costs a few microseconds on a GPU; on a CPU use model.forward.
"""
from .backend import namespace_of
from .model import attention, layer_norm, linear, lm_head, merge_heads, mlp, qkv_heads


def static_self_attention(x, c_attn, c_proj, n_head: int, k_cache, v_cache, positions, visible):
    """model.causal_self_attention with the positions as data.

    x [T, d]; k_cache, v_cache [H, C, D]; positions [T] ints; visible [T, C] bool -> [T, d]
    """
    q, k, v = qkv_heads(x, c_attn, n_head)  # 3 x [H, T, D]
    k_cache[:, positions, :] = k  # a scatter: where it writes is data, not the shape of the work
    v_cache[:, positions, :] = v
    out = attention(q, k_cache, v_cache, visible)  # [H, T, D], over all C rows, masked
    return linear(merge_heads(out), **c_proj)  # [T, d]


def static_forward(params: dict, ids, positions, k, v, n_head: int, n_logits: int):
    """Feed tokens `ids` at absolute `positions`; return logits for the last n_logits rows.

    ids, positions: [T] integer arrays of the weights' backend; k, v: a KVCache's arrays
    [n_layer, H, C, D]. The caller keeps the cache's length (see gpt2_cupy/graphs.py).
    Returns [n_logits, V].
    """
    wte, wpe = params["wte"], params["wpe"]
    xp = namespace_of(wte)
    C = k.shape[2]
    x = xp.take(wte, ids, axis=0) + xp.take(wpe, positions, axis=0)  # [T, d]
    # Key row j is visible to a query at position p iff j <= p: rows beyond the newest token
    # are never seen, whatever they hold.
    visible = xp.reshape(xp.arange(C), (1, C)) <= xp.reshape(positions, (-1, 1))  # [T, C]
    for i, block in enumerate(params["blocks"]):  # model.transformer_block, attention swapped
        x = x + static_self_attention(layer_norm(x, **block["ln_1"]), **block["attn"],
                                      n_head=n_head, k_cache=k[i, ...], v_cache=v[i, ...],
                                      positions=positions, visible=visible)
        x = x + mlp(layer_norm(x, **block["ln_2"]), **block["mlp"])
    T = x.shape[0]
    return lm_head(layer_norm(x[T - n_logits :, :], **params["ln_f"]), wte)  # [n_logits, V]
