"""GPT-2's forward pass over an explicit, preallocated KV cache. The shapes in the comments:
    T      new tokens fed in this call          n_past  tokens already in the cache
    L      n_past + T, the keys a query sees    d       n_embd
    H      n_head                               D       d // H, the size of one head
    V      n_vocab

Every function takes float32 arrays of one backend (NumPy, CuPy or any Array-API library) and
asks them for it (`namespace_of`): this file is the model for CPU and GPU alike. The parameters
are nested dicts named as in the checkpoint (checkpoint.py), used as stored (no copies):
    wte [V, d], wpe [n_ctx, d], ln_f {g, b},
    blocks[i] = {ln_1, attn {c_attn {w [d, 3d], b}, c_proj {w [d, d], b}}, ln_2,
                 mlp {c_fc {w [d, 4d], b}, c_proj {w [4d, d], b}}}
"""
import math

from .backend import namespace_of
from .errors import GPT2Error


def gelu(x):
    """GPT-2's GELU: the tanh approximation, not erf; the weights were trained with this one."""
    xp = namespace_of(x)
    return 0.5 * x * (1.0 + xp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * (x * x * x))))


def softmax(x):
    """softmax over the last axis; subtracting the max keeps exp() from overflowing."""
    xp = namespace_of(x)
    e = xp.exp(x - xp.max(x, axis=-1, keepdims=True))
    return e / xp.sum(e, axis=-1, keepdims=True)


def layer_norm(x, g, b, eps: float = 1e-5):
    """Normalise each row to zero mean and unit (biased) variance, then scale and shift.  [T, d]"""
    xp = namespace_of(x)
    d = x.shape[-1]
    centred = x - xp.sum(x, axis=-1, keepdims=True) / d  # [T, d], each row minus its mean
    var = xp.sum(centred * centred, axis=-1, keepdims=True) / d  # [T, 1], biased (divide by d)
    return g * centred / xp.sqrt(var + eps) + b


def linear(x, w, b):
    """x @ w + b.  TF's Conv1D stores w as [n_in, n_out], so no transpose.  [T, n_in] -> [T, n_out]"""
    return x @ w + b


def split_heads(x, n_head: int):
    """[T, d] -> [H, T, D]"""
    xp = namespace_of(x)
    T, d = x.shape
    return xp.permute_dims(xp.reshape(x, (T, n_head, d // n_head)), (1, 0, 2))


def merge_heads(x):
    """[H, T, D] -> [T, d]"""
    xp = namespace_of(x)
    H, T, D = x.shape
    return xp.reshape(xp.permute_dims(x, (1, 0, 2)), (T, H * D))


def causal_mask(n_past: int, T: int, xp):
    """Query t sits at position n_past + t and sees keys 0..n_past + t: the causal mask aligned
    to the lower-right corner, as the new queries come after n_past cached keys.  -> [T, L] bool"""
    query_pos = xp.reshape(xp.arange(T), (T, 1)) + n_past  # [T, 1]
    key_pos = xp.reshape(xp.arange(n_past + T), (1, n_past + T))  # [1, L]
    return key_pos <= query_pos


def attention(q, k, v, visible=None):
    """Scaled dot-product attention of T queries over L keys, each query seeing only the keys
    `visible` [T, L] allows (None: all).  q [H, T, D], k [H, L, D], v [H, L, D] -> [H, T, D]"""
    xp = namespace_of(q)
    D = q.shape[2]
    # Scaling q rather than the scores: the same product, on D numbers per query instead of L.
    scores = (q * (1.0 / math.sqrt(D))) @ xp.permute_dims(k, (0, 2, 1))  # [H, T, L]
    if visible is not None:
        # -1e10 rather than -inf, so that a row can never become all -inf (NaN after softmax);
        # full_like makes the fill on the scores' own device (no copy from the host).
        scores = xp.where(visible, scores, xp.full_like(scores, -1e10))
    return softmax(scores) @ v  # [H, T, L] @ [H, L, D] -> [H, T, D]


def causal_self_attention(x, c_attn, c_proj, n_head: int, k_cache, v_cache, n_past: int,
                          visible=None):
    """Multi-head attention that writes this call's keys/values into the layer's cache.
    x [T, d]; k_cache, v_cache [H, capacity, D], rows 0..n_past-1 already filled -> [T, d]"""
    T = x.shape[0]
    heads = split_heads(linear(x, **c_attn), 3 * n_head)  # [T, 3d] -> [3H, T, D]
    q, k, v = (heads[i * n_head : (i + 1) * n_head, ...] for i in range(3))  # 3 x [H, T, D]
    L = n_past + T
    # Write only the new rows, n_past..L-1; older ones are reused as they are.
    k_cache[:, n_past:L, :] = k
    v_cache[:, n_past:L, :] = v
    out = attention(q, k_cache[:, :L, :], v_cache[:, :L, :], visible)  # [H, T, D]
    return linear(merge_heads(out), **c_proj)  # [T, d]


def mlp(x, c_fc, c_proj):
    """Position-wise feed-forward network.  [T, d] -> [T, 4d] -> [T, d]"""
    return linear(gelu(linear(x, **c_fc)), **c_proj)


def transformer_block(x, ln_1, attn, ln_2, mlp_params, n_head, k_cache, v_cache, n_past,
                      visible=None):
    """Pre-norm residual block: x + attn(ln_1(x)), then + mlp(ln_2(x)).  [T, d] -> [T, d]"""
    x = x + causal_self_attention(layer_norm(x, **ln_1), **attn, n_head=n_head, k_cache=k_cache,
                                  v_cache=v_cache, n_past=n_past, visible=visible)
    return x + mlp(layer_norm(x, **ln_2), **mlp_params)


def lm_head(h, wte):
    """Logits from the tied head: wte itself, transposed (a view).  [T, d] @ [d, V] -> [T, V]"""
    return h @ wte.T


class KVCache:
    """Keys and values of every layer for the tokens fed so far, in arrays allocated once:
    k, v [n_layer, H, capacity, D], rows [0, length) meaningful. Rolling back is `length = n`:
    the stale rows are overwritten by the next forward; nothing is copied or appended."""

    def __init__(self, hparams: dict, capacity: int, xp, dtype=None):
        n_layer, n_head, d = hparams["n_layer"], hparams["n_head"], hparams["n_embd"]
        if not 0 < capacity <= hparams["n_ctx"]:
            raise GPT2Error(f"KV cache capacity {capacity} must be in 1..n_ctx={hparams['n_ctx']}")
        shape = (n_layer, n_head, capacity, d // n_head)
        self.k = xp.zeros(shape, dtype=xp.float32 if dtype is None else dtype)
        self.v = xp.zeros(shape, dtype=xp.float32 if dtype is None else dtype)
        self.capacity, self.length = capacity, 0

    def check_room(self, T: int) -> None:
        """Before a forward feeds T new tokens: at least one, and rows left for all of them."""
        if T == 0:
            raise ValueError("forward needs at least one new token")
        if self.length + T > self.capacity:
            raise GPT2Error(f"sequence of {self.length + T} tokens does not fit the KV cache "
                            f"({self.capacity} positions)")

    def rollback(self, length: int) -> None:
        """Forget every token after the first `length`: O(1), the arrays are untouched."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot roll back a cache of length {self.length} to {length}")
        self.length = length


def hidden_states(params: dict, ids, cache: KVCache, n_head: int, n_rows=1, positions=None,
                  visible=None):
    """Feed T new token ids after the cache's `length` tokens; return the final hidden states
    (after the last layer norm: what the LM head scores) of the last n_rows rows (None: all).
    The new tokens continue the sequence (positions n_past.., the causal mask) unless the caller
    says otherwise: positions [T] ints, visible [T, L] bool.  -> [n_rows, d]"""
    wte, wpe = params["wte"], params["wpe"]
    xp = namespace_of(wte)
    n_past, T = cache.length, len(ids)
    cache.check_room(T)
    if positions is None:  # each new token's position starts at the cache length, not at 0
        position_embeddings = wpe[n_past : n_past + T, :]  # [T, d], a view
    else:
        position_embeddings = xp.take(wpe, xp.asarray(positions), axis=0)  # [T, d]
    if visible is None and T > 1:  # (a single query sees every key)
        visible = causal_mask(n_past, T, xp)  # [T, L]
    visible = None if visible is None else xp.asarray(visible)  # a caller's may be NumPy's
    x = xp.take(wte, xp.asarray(ids), axis=0) + position_embeddings  # [T, d]
    for i, block in enumerate(params["blocks"]):
        x = transformer_block(x, block["ln_1"], block["attn"], block["ln_2"], block["mlp"],
                              n_head, cache.k[i, ...], cache.v[i, ...], n_past, visible)
    cache.length = n_past + T
    n_rows = T if n_rows is None else n_rows
    return layer_norm(x[T - n_rows :, :], **params["ln_f"])  # [n_rows, d]


def forward(params: dict, ids, cache: KVCache, n_head: int, n_logits=1, positions=None,
            visible=None):
    """hidden_states, then the LM head (a small model's costliest product) on the last n_logits
    rows only (None: all; 0: none, as for a prefill).  -> [n_logits, V]"""
    h = hidden_states(params, ids, cache, n_head, n_logits, positions, visible)
    return lm_head(h, params["wte"]) if h.shape[0] else None
