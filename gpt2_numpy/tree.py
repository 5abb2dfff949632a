"""Speculative sampling over a token tree: several candidate continuations, one target forward.

A chain proposes one token per position, and the round ends at the first one the target
rejects, even when the draft's second choice was right. A tree proposes several children per
node: widths = (w_1, ..., w_D) gives every node at depth d - 1 up to w_d children (the root, at
depth 0, gets w_1), so (2, 2, 1, 1) has 2 + 4 + 4 + 4 = 14 nodes. The root is the newest
committed token. What a tree adds to the chain of decoding.py:

    - the target sees a tree in ONE forward: each row sees the committed tokens, its ancestors
      and itself (tree_mask), at the position of its depth (tree_positions): model.forward's
      `positions` and `visible` hooks (feed_tree);
    - rollback becomes a gather: the accepted path's K/V rows move down behind the committed
      prefix (keep);
    - the rule at a node tries its children x_1, x_2, ... in turn (accept_one_of): x_j is
      accepted with probability min(1, p(x_j) / q_j(x_j)), q_j the law x_j was drawn from (q
      less x_1..x_{j-1}, drawn WITHOUT replacement); after a rejection p becomes the residual
      norm(max(0, p - q_j)). Every child rejected: a draw from the last residual; at a leaf: a
      bonus token from its own p (walk). At temperature 0 the children are the draft's top-w
      and the walk follows the target's argmax.
    - a drafter proposes a whole tree (TreeDrafter); a draft model does it with one forward per
      depth over the nodes above it (ModelTreeDrafter).

This is recursive rejection sampling with sampling without replacement (Sequoia, Chen et al.
2024; Recursive Speculative Decoding, Jeon et al. 2024). Why it is exact: trying x_1 ~ q is
Leviathan et al.'s step, whose output is p: min(p, q) from acceptance plus, on rejection, the
residual r = norm(max(0, p - q)). So given a rejection (and whatever x_1 was) the output must
follow r; the rest of the node is the same step with target r and x_2 drawn from q without x_1,
which is exactly the law x_2 was drawn from, so by induction it outputs r. A rejected x_1 had
q(x_1) > p(x_1), so r(x_1) = 0: no later child needs it, and none repeats it. Children were
drawn given their parent's path only, so below an accepted node the same argument applies.
A node with one child is exactly the chain's rule (accept_or_resample).

Stats, as for the chain: `drafted` counts the nodes proposed, `accepted` the nodes on the
accepted path (siblings of an accepted node count as drafted, so a wide tree's acceptance rate
is low by construction); `tokens_per_round` is tokens per target forward, the number a tree
raises. `draft_seconds` is all the time spent drafting the trees (the draft's forwards and the
choice of children), `draft_calls` the draft's forwards.
"""
from typing import Callable, List, Optional

import numpy as np

from .backend import to_numpy
from .checks import check_vocabularies, checked_request, not_drawn_from_q
from .decoding import ModelDrafter, prefill
from .errors import GPT2Error
from .model import KVCache
from .sampling import Warp, probabilities, residual, sample
from .stats import Timed

MAX_TREE_NODES = 64  # a verify forward over 65 rows; far past any row count that is ~free


class Tree:
    """A round's token tree, each parent before its children. Row 0 is the root, the newest
    committed token; rows 1.. are the drafted nodes. Per row: its token, its parent (-1 for the
    root: the committed token before it), its children (rows, in the order they were drawn) and
    q, the law they were drawn from without replacement (None: chosen without sampling)."""

    def __init__(self, root: int):
        self.tokens, self.parents, self.children, self.q = [root], [-1], [[]], [None]

    def add(self, parent: int, token: int) -> int:
        self.tokens.append(token)
        self.parents.append(parent)
        self.children.append([])
        self.q.append(None)
        self.children[parent].append(len(self.tokens) - 1)
        return len(self.tokens) - 1

    @property
    def n_nodes(self) -> int:
        return len(self.tokens) - 1


def tree_mask(n_before: int, parents) -> np.ndarray:
    """Which keys each row of a token tree may see: the n_before keys before the tree, the row's
    ancestors in the tree and itself, never a sibling or a cousin.  -> [N, n_before + N] bool

    parents[i] is the tree row that is row i's parent, or -1 where the parent is the token just
    before the tree (key n_before - 1); a parent comes before its children (parents[i] < i).
    A chain (parents -1, 0, 1, ...) gives model.causal_mask.
    """
    sees = np.zeros((len(parents), n_before + len(parents)), dtype=bool)  # [N, L]
    sees[:, :n_before] = True  # every row sees the keys before the tree
    for i, parent in enumerate(parents):
        if parent >= 0:
            sees[i] = sees[parent]  # what its parent sees: the parent and the parent's ancestors
        sees[i, n_before + i] = True  # and itself
    return sees


def tree_positions(n_before: int, parents) -> np.ndarray:
    """Each tree row's position in the sequence: n_before plus its depth below the token before
    the tree (0 where parents[i] = -1), not its row index: siblings share a position.  -> [N]"""
    depth = []
    for parent in parents:
        depth.append(0 if parent < 0 else depth[parent] + 1)
    return n_before + np.asarray(depth, dtype=np.int64)


def feed_tree(model, tokens, cache: KVCache, parents, n_logits=None):
    """Feed the last len(tokens) rows of a token tree (parents: the whole tree so far, as in
    tree_mask) after the cache's rows, which end with the tree's earlier rows: the model's
    forward with the tree's positions and mask instead of a chain's.  -> [n_logits, V]"""
    T = len(tokens)
    n_before = cache.length + T - len(parents)  # keys before the tree
    if not 0 <= n_before <= cache.length:
        raise ValueError(f"{len(parents)} parents for a tree that ends with {T} new rows after "
                         f"{cache.length} cached ones")
    return model(tokens, cache, n_logits, positions=tree_positions(n_before, parents)[-T:],
                 visible=tree_mask(n_before, parents)[-T:, :])


def keep(cache: KVCache, length: int, path) -> None:
    """A tree's rollback: keep the first `length` rows, followed by the rows length + path[0],
    length + path[1], ... (the accepted path, ascending), moved down to rows length, length + 1,
    ...: the cache then holds length + len(path) tokens, as if the path had been fed alone."""
    path = list(path)
    if not 0 <= length <= cache.length or any(length + j >= cache.length for j in path) \
            or path != sorted(set(path)):
        raise ValueError(f"cannot keep rows {path} after {length} of {cache.length}")
    m = len(path)
    # Row length + i is written from row length + path[i], with path[i] >= i: ascending, so a
    # row is overwritten only after it was read, even if the copy went row by row in place
    # (NumPy's fancy index reads all rows into a temporary first anyway).
    cache.k[:, :, length : length + m, :] = cache.k[:, :, [length + j for j in path], :]
    cache.v[:, :, length : length + m, :] = cache.v[:, :, [length + j for j in path], :]
    cache.length = length + m


def without(q: np.ndarray, token: int) -> np.ndarray:
    """q with `token` removed and the rest renormalised: the law of the next draw without
    replacement (all zeros once q's support is used up).  [V] -> [V]"""
    q = q.copy()
    q[token] = 0.0
    total = q.sum()
    return q / total if total > 0 else q


def sample_without_replacement(q: np.ndarray, n: int, rng: np.random.Generator) -> list:
    """Up to n distinct tokens: the first drawn from q, each next one from q without those drawn
    before. Fewer than n where q has fewer tokens of nonzero mass (top-k, top-p)."""
    tokens = []
    for _ in range(min(n, int(np.count_nonzero(q)))):
        tokens.append(sample(q, rng))
        q = without(q, tokens[-1])
    return tokens


def accept_one_of(children, q: Optional[np.ndarray], p: np.ndarray, rng: np.random.Generator):
    """The speculative sampling step at a node with several drafted children (recursive
    rejection sampling): try each child in turn with the rule of accept_or_resample; after a
    rejection the output must follow the residual, and the next child was drawn from q without
    the rejected one, so both are updated before the next try.

    children: x_1..x_w, distinct token ids. q [V]: the law they were drawn from without
    replacement (x_j from q less x_1..x_{j-1}, renormalised); None: they were chosen without
    sampling (the draft's top-w at temperature 0, n-gram matches), so x_j's law is one-hot at it.
    p [V]: the target's distribution at the node.
    Returns (i, token): children[i] (x_{i+1}) was accepted, token = children[i]; or i = None and
    token was drawn from the residual left after every child was rejected. One child and a q is
    exactly accept_or_resample's step for one draft.
    """
    for i, x in enumerate(children):
        if x in children[:i]:  # without replacement, a token is drawn once
            raise GPT2Error(f"the drafter proposed token {x} twice as children of one node: a "
                            f"node's children must be distinct (drawn without replacement)")
        law = q if q is not None else np.eye(1, len(p), x)[0]  # [V]: the law x was drawn from
        if not law[x] > 0:
            raise not_drawn_from_q(x, f"as child {i + 1} of a node")
        if rng.random() < min(1.0, p[x] / law[x]):
            return i, x
        p = residual(p, law)  # the output's law, given this rejection
        if q is not None:
            q = without(q, x)  # the next child's law
    return None, sample(p, rng)


def walk(tree: Tree, logits: np.ndarray, warp: Warp, rng):
    """Step 3: from the root, accept children by the multi-candidate rule. logits [1 + N, V]:
    the target's at every tree row; a row becomes p, the target's distribution there, only when
    the walk reaches it (most rows never are). Returns (path, t, kind): the accepted rows, root
    excluded, then the token t that ends the round and how it came ("resampled", "bonus", or
    "target" for a tree without nodes)."""
    node, path = 0, []
    while tree.children[node]:
        children = tree.children[node]
        p = probabilities(logits[node], warp)  # [V]
        j, t = accept_one_of([tree.tokens[c] for c in children], tree.q[node], p, rng)
        if j is None:
            return path, t, "resampled"
        node = children[j]
        path.append(node)
    return path, sample(probabilities(logits[node], warp), rng), "bonus" if tree.n_nodes else "target"


class TreeDrafter:
    """What tree_speculative_sample asks for its trees. It calls, in this order:

        start(tokens, capacity)          once, after the target's prefill
        draft(tokens, widths, warp, rng) -> Tree rooted at tokens[-1], a node at depth d - 1
                                         with at most widths[d - 1] children, each node's
                                         children drawn from its q (tree.q) or chosen (q None)
        verify(target, tree, cache)      -> [1 + N, V]: the target's ONE forward over the tree
        keep(tokens, path)               after the walk: `path` the accepted rows, tokens the
                                         committed sequence

    and reads n_vocab, and `calls` for its stats (the forwards it ran).
    """

    n_vocab: int
    calls = 0

    def start(self, tokens: List[int], capacity: int) -> None:
        pass

    def draft(self, tokens: List[int], widths, warp: Warp, rng) -> "Tree":
        raise NotImplementedError

    def verify(self, target, tree: "Tree", cache: KVCache):
        return feed_tree(target, tree.tokens, cache, tree.parents)

    def keep(self, tokens: List[int], path: List[int]) -> None:
        pass


class ModelTreeDrafter(ModelDrafter, TreeDrafter):
    """A small draft model drafting trees (draft_tree): the chain's ModelDrafter (its cache kept
    across rounds, started the same way), with a tree's draft and keep."""

    n_fed = 0  # tree rows in the draft's cache after the last draft

    def draft(self, tokens: List[int], widths, warp: Warp, rng) -> "Tree":
        if not widths:  # one token left: a plain target step
            return Tree(tokens[-1])
        tree, self.n_fed = draft_tree(self.forward, self.cache, tokens, widths, warp, rng)
        return tree

    def keep(self, tokens: List[int], path: List[int]) -> None:
        """The draft's cache keeps the root and the path's rows it was fed (never the deepest)."""
        fed = [i - 1 for i in path if i < self.n_fed]
        if self.n_fed:
            keep(self.cache, self.cache.length - self.n_fed + 1, fed)
        self.n_fed = 0


def top_w(logits: np.ndarray, w: int) -> List[int]:
    """The ids of the w largest logits, largest first, equal logits lowest id first: what
    np.argsort(-logits, kind="stable")[:w] gives, without sorting all V.  [V] -> min(w, V) ids"""
    if w >= len(logits):
        return np.argsort(-logits, kind="stable").tolist()
    wth = np.partition(logits, len(logits) - w)[len(logits) - w]  # the w-th largest logit
    ids = np.flatnonzero(logits >= wth)  # ascending ids, at least w (more where wth is tied)
    return ids[np.argsort(-logits[ids], kind="stable")][:w].tolist()


def draw_children(tree: Tree, node: int, logits: np.ndarray, w: int, warp: Warp, rng) -> None:
    """Up to w children of `node` from the draft's logits there [V]: its top-w tokens at
    temperature 0, else w draws without replacement from its warped q (fewer where q has fewer
    tokens of nonzero mass)."""
    if warp.greedy:
        children = top_w(logits, w)  # ties: the lowest id first, as the greedy argmax
    else:
        tree.q[node] = probabilities(logits, warp)  # [V]
        children = sample_without_replacement(tree.q[node], w, rng)
    for token in children:
        tree.add(node, token)


def draft_tree(draft, cache, tokens: List[int], widths, warp: Warp, rng):
    """Draft a tree with a model: one forward per depth. Returns (tree, n_fed), n_fed the tree
    rows now in the draft's cache: the root and every node above the deepest level, each at row
    root's + its own (its children were drawn from its logits; the deepest are never fed)."""
    tree, level = Tree(tokens[-1]), [0]
    # The cache lacks the root, and maybe the previous round's last accepted node: a chain.
    logits = to_numpy(draft(tokens[cache.length :], cache))  # [1, V]: the root's
    for depth, w in enumerate(widths, start=1):
        for node, row in zip(level, logits):
            draw_children(tree, node, row, w, warp, rng)
        level = [c for node in level for c in tree.children[node]]  # contiguous rows
        if depth == len(widths):
            break
        # The cache's last rows after this forward are tree rows 0..level[-1] (root first).
        logits = to_numpy(feed_tree(draft, [tree.tokens[i] for i in level], cache,
                                    tree.parents[: level[-1] + 1], len(level)))  # [len(level), V]
    return tree, len(tree.tokens) - len(level)


def tree_size(widths) -> int:
    """Nodes in a full tree: w1 + w1 w2 + ... + w1 ... wD."""
    size, level = 0, 1
    for w in widths:
        level *= w
        size += level
    return size


def check_widths(widths, room: int = None) -> None:
    """Widths are integers >= 1, at most MAX_TREE_NODES nodes in all, and no more nodes than
    `room`, the positions the context has left after the prompt (if given)."""
    if not widths or not all(isinstance(w, (int, np.integer)) and w >= 1 for w in widths):
        raise GPT2Error(f"tree widths must be integers >= 1, got {list(widths)}")
    if tree_size(widths) > MAX_TREE_NODES:
        raise GPT2Error(f"a tree of widths {list(widths)} has {tree_size(widths)} nodes, more "
                        f"than the limit of {MAX_TREE_NODES}")
    if room is not None and tree_size(widths) > room:
        raise GPT2Error(f"a tree of widths {list(widths)} has {tree_size(widths)} nodes, more "
                        f"than the {room} positions the context has left after the prompt")


def fit(widths, depth: int, room: int) -> List[int]:
    """The round's widths: at most `depth` levels (a round emits at most depth + 1 tokens) and
    at most `room` nodes (rows left in the caches), dropping the deepest levels first."""
    widths = list(widths[:depth])
    while tree_size(widths) > room:
        if len(widths) > 1:
            widths.pop()
        else:
            widths[0] = room
    return widths


def tree_speculative_sample(target, draft, prompt: List[int], n_new: int, widths,
                            warp: Warp = Warp(), rng: np.random.Generator = None,
                            on_tokens: Callable = None):
    """Sample n_new tokens from `target`, letting `draft` (a model, or a TreeDrafter, e.g. an
    NGramDrafter) propose a token tree of the given widths each round.

    Exactly n_new tokens come out (near the end the tree is cut to the depth still needed), fewer
    only if the context fills up (stats.stopped_at_context); near the end of the context the
    tree also loses levels to fit the rows left. on_tokens(ids, kinds) streams each round's
    tokens, kinds as for speculative_sample. Returns (new_token_ids, stats).
    """
    widths = list(widths)
    check_widths(widths)
    if not isinstance(draft, TreeDrafter) and not hasattr(draft, "new_cache"):
        raise GPT2Error(f"a tree's draft is a model or a TreeDrafter, not {type(draft).__name__}")
    drafter = draft if isinstance(draft, TreeDrafter) else ModelTreeDrafter(draft)
    check_vocabularies(drafter, target)
    rng = rng if rng is not None else np.random.default_rng()
    tokens, n_new, stats = checked_request(target, prompt, n_new, "speculative")
    n_stop = len(tokens) + n_new
    capacity = min(target.n_ctx, n_stop - 1 + tree_size(widths))  # room for a whole tree
    cache = target.new_cache(capacity)

    with stats.timing("prefill_seconds"):
        prefill(target, cache, tokens)
        drafter.start(tokens, capacity)

    verifying = Timed(drafter.verify)  # the target's forwards over the trees, and their seconds
    drafting = Timed(drafter.draft)  # all the drafting: its forwards and choosing children
    with stats.timing("decode_seconds"):
        while len(tokens) < n_stop:
            # At most n_stop - len(tokens) tokens this round, and 1 + nodes rows from row len - 1.
            shape = fit(widths, n_stop - len(tokens) - 1, capacity - len(tokens))
            # 1. The drafter proposes a tree rooted at the newest committed token.
            tree = drafting(tokens, shape, warp, rng)
            # 2. ONE target forward over the root and every node: p at each of them.
            n_past = cache.length  # the root's row; node i is at row n_past + i
            logits = to_numpy(verifying(target, tree, cache))  # [1 + N, V]
            # 3. The walk from the root: the accepted path, then one more token t.
            path, t, kind = walk(tree, logits, warp, rng)
            tokens += [tree.tokens[i] for i in path] + [t]
            # 4. Both caches keep the root and the accepted path (gathered behind it), never t.
            keep(cache, n_past + 1, [i - 1 for i in path])
            drafter.keep(tokens, path)
            assert cache.length == len(tokens) - 1
            stats.add_round(tree.n_nodes, len(path), depth=len(shape))
            if on_tokens:
                on_tokens(tokens[-(len(path) + 1) :], ["accepted"] * len(path) + [kind])
    stats.count_forwards(verifying, drafting)  # draft_seconds: forwards and choosing children
    stats.draft_calls = drafter.calls  # the draft's forwards, as for a chain
    stats.n_generated = len(tokens) - stats.n_prompt
    return tokens[stats.n_prompt :], stats
