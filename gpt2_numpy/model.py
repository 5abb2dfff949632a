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

import numpy as np  # only to lay out a tree's mask on the host (tree_mask)

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


def tree_mask(n_before: int, n_rows: int, xp, parents=None):
    """Which keys each row of a token tree may see: the n_before keys before the tree, the row's
    ancestors in the tree and itself, never a sibling or a cousin.  -> [n_rows, L] bool,
    L = n_before + n_rows

    parents[i] is the tree row that is row i's parent, or -1 where the parent is the token just
    before the tree (key n_before - 1); a parent comes before its children (parents[i] < i).
    None is a chain, parents -1, 0, 1, ..., n_rows - 2: row t's ancestors are rows 0..t-1, so
    query t (at absolute position n_before + t) sees keys 0..n_before + t, the causal mask,
    aligned to the lower-right corner. A chain is built in closed form (a prefill is a chain of
    up to n_ctx rows); a tree, of a few dozen rows, on the host, row by row.
    """
    L = n_before + n_rows
    if parents is None:
        query_pos = xp.reshape(xp.arange(n_rows), (n_rows, 1)) + n_before  # [N, 1]
        key_pos = xp.reshape(xp.arange(L), (1, L))  # [1, L]
        return key_pos <= query_pos
    sees = np.zeros((n_rows, L), dtype=bool)  # [N, L]
    sees[:, :n_before] = True  # every row sees the keys before the tree
    for i, parent in enumerate(parents):
        if parent >= 0:
            sees[i] = sees[parent]  # what its parent sees: the parent and the parent's ancestors
        sees[i, n_before + i] = True  # and itself
    return xp.asarray(sees)


def causal_mask(n_past: int, T: int, xp):
    """The tree mask of a chain: query t sits at absolute position n_past + t and sees keys
    0..n_past + t.  -> [T, L] bool, L = n_past + T"""
    return tree_mask(n_past, T, xp)


def tree_positions(n_before: int, parents, xp):
    """Absolute position of each tree row: n_before plus its depth below the token before the
    tree (0 where parents[i] = -1), not its row index: siblings share a position.  -> [N] int"""
    depth = []
    for parent in parents:
        depth.append(0 if parent < 0 else depth[parent] + 1)
    return xp.asarray([n_before + d for d in depth])


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
                          visible=None, matmul=matmul):
    """Multi-head attention that appends this call's keys/values to the layer's cache.

    x [T, d]; k_cache, v_cache [H, capacity, D], rows 0..n_past-1 already filled;
    visible [T, L]: the keys each query sees (tree_mask; None: all) -> [T, d]
    """
    T = x.shape[0]
    q, k, v = qkv_heads(x, c_attn, n_head, matmul)  # 3 x [H, T, D]
    L = n_past + T
    # Write only the new rows, at rows n_past..L-1 (in a tree, a row index, not a position);
    # older ones are reused as they are.
    k_cache[:, n_past:L, :] = k
    v_cache[:, n_past:L, :] = v
    out = attention(q, k_cache[:, :L, :], v_cache[:, :L, :], visible)  # [H, T, D]
    return linear(merge_heads(out), **c_proj, matmul=matmul)  # [T, d]


def mlp(x, c_fc, c_proj, matmul=matmul):
    """Position-wise feed-forward network.  [T, d] -> [T, 4d] -> [T, d]"""
    return linear(gelu(linear(x, **c_fc, matmul=matmul)), **c_proj, matmul=matmul)


def transformer_block(x, ln_1, attn, ln_2, mlp_params, n_head, k_cache, v_cache, n_past,
                      visible=None, matmul=matmul):
    """Pre-norm residual block: x + attn(ln_1(x)), then + mlp(ln_2(x)).  [T, d] -> [T, d]"""
    x = x + causal_self_attention(layer_norm(x, **ln_1), **attn, n_head=n_head, k_cache=k_cache,
                                  v_cache=v_cache, n_past=n_past, visible=visible, matmul=matmul)
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

    After a token tree (forward's `parents`), the accepted path is scattered among rows of
    rejected siblings: rollback generalises from a slice to a gather (`keep`), which copies the
    path's rows down behind the committed prefix, then sets the length.
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

    def keep(self, length: int, path) -> None:
        """Keep the first `length` tokens, followed by the rows length + path[0], length +
        path[1], ... (a tree's accepted path, path ascending): they move down to rows length,
        length + 1, ..., and the cache holds length + len(path) tokens."""
        path = list(path)
        if not 0 <= length <= self.length or any(length + j >= self.length for j in path) \
                or path != sorted(set(path)):
            raise ValueError(f"cannot keep rows {path} after {length} of {self.length}")
        m = len(path)
        # Row length + i is written from row length + path[i], with path[i] >= i: ascending, so
        # a row is overwritten only after it was read, even if the copy went row by row in place
        # (NumPy's fancy index reads all rows into a temporary first anyway).
        self.k[:, :, length : length + m, :] = self.k[:, :, [length + j for j in path], :]
        self.v[:, :, length : length + m, :] = self.v[:, :, [length + j for j in path], :]
        self.length = length + m


def forward(params: dict, ids, cache: KVCache, n_head: int, n_logits=1, parents=None,
            matmul=matmul):
    """Feed T new token ids after the cache's `length` tokens; return logits for the last rows.

    ids: T ints. n_logits: how many of the last rows to return logits for (None: all T, 0: none,
    as for a prefill whose output nobody reads). The LM head is the most expensive matmul for
    small models ([*, d] @ [d, V]), so rows nobody samples from are not computed.
    parents: None, the new tokens are a chain, each following the one before; or a token tree
    (tree_mask): parents[i] is the parent of the i-th of the cache's last len(parents) rows
    after this call, the new rows being the last T of them (a tree can be fed a level at a time).
    matmul(x, w): how the weight products are computed (x @ w; GPT2 passes its `Products`).
    Returns [n_logits, V] and advances cache.length by T.
    """
    wte, wpe = params["wte"], params["wpe"]
    xp = namespace_of(wte)
    n_past, T = cache.length, len(ids)
    cache.check_room(T)
    ids = xp.asarray(ids)
    # Each token's absolute position starts at the cache length, not at 0: the new tokens
    # continue the sequence already in the cache. In a tree it is the depth, not the row.
    if parents is None:
        position_embeddings = wpe[n_past : n_past + T, :]  # [T, d], positions n_past..n_past+T-1
        visible = causal_mask(n_past, T, xp) if T > 1 else None  # [T, L]; one query sees all
    else:
        n_before = n_past + T - len(parents)  # keys before the tree
        if not 0 <= n_before <= n_past:
            raise ValueError(f"{len(parents)} parents for a tree that ends with {T} new rows "
                             f"after {n_past} cached ones")
        positions = tree_positions(n_before, parents, xp)[-T:]  # [T]
        position_embeddings = xp.take(wpe, positions, axis=0)  # [T, d]
        visible = tree_mask(n_before, len(parents), xp, parents)[-T:, :]  # [T, L]
    x = xp.take(wte, ids, axis=0) + position_embeddings  # [T, d]
    for i, block in enumerate(params["blocks"]):
        x = transformer_block(x, block["ln_1"], block["attn"], block["ln_2"], block["mlp"],
                              n_head, cache.k[i, ...], cache.v[i, ...], n_past, visible, matmul)
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

    def __call__(self, ids, cache: KVCache, n_logits=1, parents=None):
        return forward(self.params, ids, cache, self.hparams["n_head"], n_logits, parents,
                       self.products)

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
