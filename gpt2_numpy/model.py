"""GPT-2's forward pass over an explicit, preallocated KV cache.

Notation (shapes in the comments):
    T      new tokens fed in this call          n_past  tokens already in the cache
    L      n_past + T, the keys a query sees    d       n_embd
    H      n_head                               D       d // H, the size of one head
    V      n_vocab

Every function takes and returns float32 arrays of one backend. The backend (NumPy, CuPy, or any
Array-API library) is read off the arrays with `namespace_of`, so this file is the one source of
the model for CPU and GPU alike.

The parameter tree mirrors the checkpoint's names (see checkpoint.py):
    wte [V, d], wpe [n_ctx, d], ln_f {g, b},
    blocks[i] = {ln_1, attn {c_attn {w [d, 3d], b}, c_proj {w [d, d], b}}, ln_2,
                 mlp {c_fc {w [d, 4d], b}, c_proj {w [4d, d], b}}}

The weights are used exactly as the checkpoint stores them (no copies, no re-layout). How fast
this runs, and how the weight products of a few rows are computed, is in docs/performance.md.
"""
import math

from .backend import namespace_of
from .errors import GPT2Error
from .products import Products, weight_matrices


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


def matmul(x, w):
    """x @ w.  [T, n] @ [n, m] -> [T, m], batched too: [B, T, n] @ [B, n, m] -> [B, T, m].
    forward multiplies by the weights through a `matmul` argument instead, which GPT2 sets to
    its `Products` (products.py): the same product, computed the fastest way for few rows."""
    return x @ w


def linear(x, w, b, matmul=matmul):
    """x @ w + b.  TF's Conv1D stores w as [n_in, n_out], so no transpose.  [T, n_in] -> [T, n_out]"""
    return matmul(x, w) + b


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
    """Which keys each new query may see: query t sits at absolute position n_past + t and sees
    keys 0..n_past + t, a mask aligned to the lower-right corner.  -> [T, L] bool, L = n_past + T"""
    query_pos = xp.reshape(xp.arange(T), (T, 1)) + n_past  # [T, 1]
    key_pos = xp.reshape(xp.arange(n_past + T), (1, n_past + T))  # [1, L]
    return key_pos <= query_pos


def attention(q, k, v, visible=None):
    """Scaled dot-product attention of T queries over L keys; `visible` [T, L] masks the keys a
    query may not see (None: it sees all, as a single decoding query does).

    q [H, T, D], k [H, L, D], v [H, L, D] -> [H, T, D]
    """
    xp = namespace_of(q)
    D = q.shape[2]
    # Scaling q rather than the scores: the same product, on D numbers per query instead of L.
    scores = matmul(q * (1.0 / math.sqrt(D)), xp.permute_dims(k, (0, 2, 1)))  # [H, T, L]
    if visible is not None:
        # -1e10 rather than -inf, so that a row can never become all -inf (NaN after softmax);
        # full_like makes the fill on the scores' own device (no copy from the host).
        scores = xp.where(visible, scores, xp.full_like(scores, -1e10))
    return matmul(softmax(scores), v)  # [H, T, L] @ [H, L, D] -> [H, T, D]


def qkv_heads(x, c_attn, n_head: int, matmul=matmul):
    """One product for queries, keys and values, split into heads.  [T, d] -> 3 x [H, T, D]"""
    qkv = linear(x, **c_attn, matmul=matmul)  # [T, 3d]
    heads = split_heads(qkv, 3 * n_head)  # [3H, T, D]: q's H heads, k's, v's
    return tuple(heads[i * n_head : (i + 1) * n_head, ...] for i in range(3))


def causal_self_attention(x, c_attn, c_proj, n_head: int, k_cache, v_cache, n_past: int,
                          matmul=matmul):
    """Multi-head attention that appends this call's keys/values to the layer's cache.

    x [T, d]; k_cache, v_cache [H, capacity, D], rows 0..n_past-1 already filled -> [T, d]
    """
    T = x.shape[0]
    q, k, v = qkv_heads(x, c_attn, n_head, matmul)  # 3 x [H, T, D]
    L = n_past + T
    k_cache[:, n_past:L, :] = k  # write only the new rows; older ones are reused as they are
    v_cache[:, n_past:L, :] = v
    visible = causal_mask(n_past, T, namespace_of(x)) if T > 1 else None
    out = attention(q, k_cache[:, :L, :], v_cache[:, :L, :], visible)  # [H, T, D]
    return linear(merge_heads(out), **c_proj, matmul=matmul)  # [T, d]


def mlp(x, c_fc, c_proj, matmul=matmul):
    """Position-wise feed-forward network.  [T, d] -> [T, 4d] -> [T, d]"""
    return linear(gelu(linear(x, **c_fc, matmul=matmul)), **c_proj, matmul=matmul)


def transformer_block(x, ln_1, attn, ln_2, mlp_params, n_head, k_cache, v_cache, n_past,
                      matmul=matmul):
    """Pre-norm residual block: x + attn(ln_1(x)), then + mlp(ln_2(x)).  [T, d] -> [T, d]"""
    x = x + causal_self_attention(layer_norm(x, **ln_1), **attn, n_head=n_head, k_cache=k_cache,
                                  v_cache=v_cache, n_past=n_past, matmul=matmul)
    return x + mlp(layer_norm(x, **ln_2), **mlp_params, matmul=matmul)


def lm_head(x, wte, matmul=matmul):
    """Logits: scores against every token embedding. The head is tied: it IS wte, transposed
    (a view, not a copy).  [T, d] @ [d, V] -> [T, V]"""
    return matmul(x, wte.T)


class KVCache:
    """Keys and values of every layer for the tokens fed so far, in arrays allocated once.

    k, v: [n_layer, H, capacity, D]. Only rows [0, length) are meaningful. Rolling back to n
    tokens just sets `length = n`: the stale rows beyond it are overwritten by the next forward,
    so a rejected draft costs no copy and nothing is ever appended or concatenated.
    """

    def __init__(self, hparams: dict, capacity: int, xp, dtype=None):
        n_layer, n_head, d = hparams["n_layer"], hparams["n_head"], hparams["n_embd"]
        if not 0 < capacity <= hparams["n_ctx"]:
            raise GPT2Error(f"KV cache capacity {capacity} must be in 1..n_ctx={hparams['n_ctx']}")
        shape = (n_layer, n_head, capacity, d // n_head)
        dtype = xp.float32 if dtype is None else dtype
        self.k = xp.zeros(shape, dtype=dtype)
        self.v = xp.zeros(shape, dtype=dtype)
        self.capacity = capacity
        self.length = 0

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


def forward(params: dict, ids, cache: KVCache, n_head: int, n_logits=1, matmul=matmul):
    """Feed T new token ids after the cache's `length` tokens; return logits for the last rows.

    ids: T ints. n_logits: how many of the last rows to return logits for (None: all T, 0: none,
    as for a prefill whose output nobody reads). The LM head is the most expensive matmul for
    small models ([*, d] @ [d, V]), so rows nobody samples from are not computed. matmul(x, w):
    how the weight products are computed (x @ w; GPT2 passes its `Products`).
    Returns [n_logits, V] and advances cache.length by T.
    """
    wte, wpe = params["wte"], params["wpe"]
    xp = namespace_of(wte)
    n_past, T = cache.length, len(ids)
    cache.check_room(T)
    ids = xp.asarray(ids)
    # Token embedding plus the embedding of each token's absolute position, which starts at the
    # cache length, not at 0: the new tokens continue the sequence already in the cache.
    x = xp.take(wte, ids, axis=0) + wpe[n_past : n_past + T, :]  # [T, d]
    for i, block in enumerate(params["blocks"]):
        x = transformer_block(x, block["ln_1"], block["attn"], block["ln_2"], block["mlp"],
                              n_head, cache.k[i, ...], cache.v[i, ...], n_past, matmul)
    cache.length = n_past + T
    n_logits = T if n_logits is None else n_logits
    if n_logits == 0:
        return None
    x = layer_norm(x[T - n_logits :, :], **params["ln_f"])  # [n_logits, d]
    return lm_head(x, wte, matmul)  # [n_logits, V]


class GPT2:
    """A loaded model: hyperparameters, the parameter tree, and (optionally) its tokenizer.

    `model(ids, cache)` is `forward(model.params, ids, cache, n_head, matmul=model.products)`;
    `model.params` is the parameter tree as loaded (for official files: read-only views of the
    checkpoint's bytes); `model.products` computes its weight products (products.py), with a
    plan for each number of rows that `warm_up` measures.
    """

    def __init__(self, hparams: dict, params: dict, tokenizer=None, name: str = "gpt2",
                 products: Products = None):
        self.hparams, self.tokenizer, self.name = hparams, tokenizer, name
        self.params = params
        self.xp = namespace_of(params["wte"])
        self.products = Products() if products is None else products

    @property
    def n_ctx(self) -> int:
        return self.hparams["n_ctx"]

    @property
    def n_vocab(self) -> int:
        return self.hparams["n_vocab"]

    def new_cache(self, capacity: int = None) -> KVCache:
        """An empty KV cache for up to `capacity` tokens (default: the whole context)."""
        return KVCache(self.hparams, capacity or self.n_ctx, self.xp, self.params["wte"].dtype)

    def __call__(self, ids, cache: KVCache, n_logits=1):
        return forward(self.params, ids, cache, self.hparams["n_head"], n_logits, self.products)

    def warm_up(self, capacity: int = None) -> None:
        """One untimed forward, so that no timed one pays for first-time work (paging the
        weights in from the checkpoint's memory map); then, on NumPy, the products' plan is
        measured on this model's matrices (seconds; docs/performance.md). `capacity`, the cache
        size the decoders will ask for, matters only to gpt2_cupy, which records its graphs."""
        self([0], self.new_cache(1))
        self.products.measure(weight_matrices(self.params))

    def __repr__(self):
        h = self.hparams
        return (f"GPT2({self.name!r}, n_layer={h['n_layer']}, n_head={h['n_head']}, "
                f"n_embd={h['n_embd']}, n_vocab={h['n_vocab']}, n_ctx={h['n_ctx']})")
