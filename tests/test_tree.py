"""Token trees: the tree forward against chains, the gather against a fresh prefill, greedy
trees against greedy decoding, and the sampled law against the target's exact one."""
import zlib

import numpy as np
import pytest

import gpt2_numpy as gpt2
from gpt2_numpy import NGramDrafter, Warp, autoregressive_sample, speculative_sample
from gpt2_numpy.model import causal_mask
from gpt2_numpy.drafters import ngram_tree
from gpt2_numpy.tree import (MAX_TREE_NODES, accept_one_of, feed_tree, keep,
                             sample_without_replacement, tree_mask, tree_size,
                             tree_speculative_sample)
from conftest import FIXTURES, perturbed, tiny_model
from test_decoding import (N_GREEDY, PROMPT, TINY, exact_distribution, goodness_of_fit,
                           total_variation)
from test_sampling import ScriptedRng, reference_residual

# Parents of a ragged tree in breadth-first order: -1 is the token before the tree.
PARENTS = [-1, 0, 0, 0, 1, 1, 2, 4, 4, 5, 6, 6]


def path_to(parents, i):
    """Rows from the tree's first row down to row i."""
    path = [i]
    while parents[path[0]] >= 0:
        path.insert(0, parents[path[0]])
    return path


def test_the_tree_mask_shows_ancestors_only_and_a_chain_is_the_causal_mask():
    n_before = 3
    visible = tree_mask(n_before, PARENTS)
    assert visible.shape == (len(PARENTS), n_before + len(PARENTS))
    for i in range(len(PARENTS)):
        seen = {j - n_before for j in np.flatnonzero(visible[i]) if j >= n_before}
        assert seen == set(path_to(PARENTS, i)) and visible[i, :n_before].all()
    chain = list(range(-1, 6))
    np.testing.assert_array_equal(tree_mask(4, chain), causal_mask(4, 7, np))


@pytest.mark.parametrize("by_level", [False, True], ids=["one forward", "a level at a time"])
def test_each_node_gets_the_logits_of_its_path_fed_alone_as_a_chain(target, by_level):
    """Row i of a tree forward must be the last row of a chain forward over the prompt and the
    path to row i. Siblings hold different tokens, so a row that saw a sibling or a cousin, or
    sat at its row index instead of its depth, would differ. Fed a level at a time (as a draft
    feeds it), the earlier levels are read from the cache."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, target.n_vocab, len(PARENTS)).tolist()
    prompt = PROMPT[:-1]
    cache = target.new_cache(32)
    target(prompt, cache, n_logits=0)
    if by_level:
        depth = [0 if p < 0 else None for p in PARENTS]
        for i, p in enumerate(PARENTS):
            depth[i] = 0 if p < 0 else depth[p] + 1
        rows = []
        for d in range(max(depth) + 1):
            level = [i for i in range(len(PARENTS)) if depth[i] == d]  # contiguous rows
            rows.append(feed_tree(target, [tokens[i] for i in level], cache,
                                  PARENTS[: level[-1] + 1], n_logits=None))
        logits = np.concatenate(rows)
    else:
        logits = feed_tree(target, tokens, cache, PARENTS)  # [N, V]
    assert cache.length == len(prompt) + len(PARENTS)
    for i in range(len(PARENTS)):
        chain = [tokens[j] for j in path_to(PARENTS, i)]
        alone = target(prompt + chain, target.new_cache(32))[0]
        np.testing.assert_allclose(logits[i], alone, atol=1e-4, rtol=0)


def test_keep_gathers_the_path_behind_the_prefix(target):
    """After keep, the cache is a fresh prefill of prompt + path: the gather, rows and length."""
    tokens = np.random.default_rng(1).integers(0, target.n_vocab, len(PARENTS)).tolist()
    cache = target.new_cache(32)
    target(PROMPT, cache, n_logits=0)
    feed_tree(target, tokens, cache, PARENTS, n_logits=0)
    path = path_to(PARENTS, 10)  # rows 0, 2, 6, 10
    keep(cache, len(PROMPT), path)
    fresh = target.new_cache(32)
    target(PROMPT + [tokens[i] for i in path], fresh, n_logits=0)
    assert cache.length == fresh.length == len(PROMPT) + len(path)
    n = fresh.length
    np.testing.assert_allclose(cache.k[:, :, :n], fresh.k[:, :, :n], atol=1e-5, rtol=0)
    np.testing.assert_allclose(cache.v[:, :, :n], fresh.v[:, :, :n], atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        keep(cache, 2, [3, 1])  # not ascending


SHAPES = [(1,), (2,), (4,), (1, 1, 1, 1), (2, 2, 2, 2), (2, 2, 1, 1), (3, 1, 2), (1, 3), (8, 1),
          (2, 1, 1, 1, 1, 1, 1, 1)]


@pytest.mark.parametrize("agreement", ["always", "often", "rarely"])
@pytest.mark.parametrize("widths", SHAPES, ids=str)
def test_greedy_tree_equals_greedy_autoregressive(target, drafts, agreement, widths):
    ar, _ = autoregressive_sample(target, PROMPT, N_GREEDY)
    ids, stats = tree_speculative_sample(target, drafts[agreement], PROMPT, N_GREEDY, widths)
    assert ids == ar and stats.n_generated == N_GREEDY
    assert stats.target_calls == stats.rounds == len(stats.accepted_per_round)
    assert sum(stats.accepted_per_round) + stats.rounds == N_GREEDY
    assert max(stats.K_per_round) <= tree_size(widths)
    if agreement == "always":  # the draft's top-1 is always right: the whole depth is accepted
        depth = len(widths)
        assert stats.rounds == -(-N_GREEDY // (depth + 1))


def test_greedy_tree_on_the_genuine_checkpoints_and_a_near_pair():
    """tiny-3h drafting for tiny-4h (unrelated) and a noisy copy of tiny-4h (near): the greedy
    text is the target's, and on the near pair a 2,2,2,2 tree emits >= 1.15x the tokens per
    target forward of the chain with K = 4 (over 12 prompts)."""
    from bench.fidelity import noisy_copy

    target = gpt2.load_model(str(FIXTURES / "tiny-4h"), progress=False)
    unrelated = gpt2.load_model(str(FIXTURES / "tiny-3h"), progress=False)
    near = noisy_copy(target, 0.01)
    rng = np.random.default_rng(0)
    chain = tree = 0
    for prompt in (rng.integers(0, target.n_vocab, 8).tolist() for _ in range(12)):
        ar, _ = autoregressive_sample(target, prompt, 40)
        assert tree_speculative_sample(target, unrelated, prompt, 40, (2, 2))[0] == ar
        ids, tree_stats = tree_speculative_sample(target, near, prompt, 40, (2, 2, 2, 2))
        chain_ids, chain_stats = speculative_sample(target, near, prompt, 40, K=4)
        assert ids == chain_ids == ar
        chain, tree = chain + chain_stats.rounds, tree + tree_stats.rounds
    assert chain / tree >= 1.15, (chain, tree)  # the same tokens: per forward = 1 / rounds


@pytest.mark.parametrize("warp", [Warp(1.0), Warp(0.8, top_k=5), Warp(1.3, top_p=0.7)], ids=str)
def test_a_tree_of_single_children_is_the_chain(target, drafts, warp):
    """Widths 1, 1, 1, 1 draw the same random numbers in the same order as the chain's K = 4,
    and a node with one child applies the chain's rule: the same tokens at every temperature."""
    for seed in range(5):
        chain, _ = speculative_sample(target, drafts["often"], PROMPT, 20, K=4, warp=warp,
                                      rng=np.random.default_rng(seed))
        tree, _ = tree_speculative_sample(target, drafts["often"], PROMPT, 20, (1, 1, 1, 1),
                                          warp, np.random.default_rng(seed))
        assert tree == chain


class Recording:
    """Wraps a model; remembers the cache it made last and what it holds (the committed tokens
    are checked against a fresh prefill instead: a tree's rows are not a chain's)."""

    def __init__(self, model):
        self.model, self.n_ctx, self.n_vocab = model, model.n_ctx, model.n_vocab
        self.cache = None

    def new_cache(self, capacity=None):
        self.cache = self.model.new_cache(capacity)
        return self.cache

    def __call__(self, ids, cache, n_logits=1, positions=None, visible=None):
        return self.model(ids, cache, n_logits, positions, visible)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("widths", [(2, 2, 2), (3, 1, 1), (1, 1)], ids=str)
def test_both_caches_hold_exactly_the_committed_prefix_after_every_round(target, drafts,
                                                                         temperature, widths):
    t, d = Recording(target), Recording(drafts["often"])
    committed, kinds = list(PROMPT), []

    def after_round(ids, round_kinds):
        committed.extend(ids)
        kinds.extend(round_kinds)
        assert t.cache.length == len(committed) - 1
        # The draft lacks nothing, or a leaf it never fed; a plain target step (the last round,
        # with one token left) does not feed it at all.
        assert len(committed) - 1 - d.cache.length in ((0, 1) if round_kinds != ["target"]
                                                       else (1, 2))
        for model in (t, d):
            n = model.cache.length
            fresh = model.model.new_cache(n)
            model.model(committed[:n], fresh, n_logits=0)
            np.testing.assert_allclose(model.cache.k[:, :, :n], fresh.k, atol=1e-4, rtol=0)
            np.testing.assert_allclose(model.cache.v[:, :, :n], fresh.v, atol=1e-4, rtol=0)

    tree_speculative_sample(t, d, PROMPT, 20, widths, Warp(temperature),
                            np.random.default_rng(0), after_round)
    assert len(kinds) == 20 and "accepted" in kinds
    assert set(kinds[:-1]) <= {"accepted", "resampled", "bonus"}  # "target": a last plain step


def test_exactly_n_new_tokens_and_a_clean_stop_at_the_context(target, drafts):
    for n in range(1, 12):
        ids, stats = tree_speculative_sample(target, drafts["often"], PROMPT, n, (2, 2, 2))
        assert len(ids) == n and not stats.stopped_at_context
    prompt = PROMPT * 11  # 55 of 64 positions: room for 9 tokens, less than one tree's 14 rows
    ar, _ = autoregressive_sample(target, prompt, 100)
    ids, stats = tree_speculative_sample(target, drafts["often"], prompt, 100, (2, 2, 2))
    assert ids == ar and stats.stopped_at_context and len(ids) == target.n_ctx - len(prompt)
    assert max(stats.K_per_round) <= target.n_ctx - len(prompt)


def test_ngram_branches_give_the_greedy_tokens_and_beat_the_chain():
    target = tiny_model(seed=3, n_vocab=12)  # a small vocabulary falls into loops: matches
    prompt = [1, 2, 3, 4, 1, 2, 5, 6, 1, 2, 3, 7, 1, 2]  # "1 2" was followed by 3, 5 and 3
    ar, _ = autoregressive_sample(target, prompt, 30)
    ngram = NGramDrafter(target.n_vocab)
    ids, stats = tree_speculative_sample(target, ngram, prompt, 30, (3, 2, 2, 1))
    chain, chain_stats = speculative_sample(target, ngram, prompt, 30, K=4)
    assert ids == chain == ar
    assert stats.drafted > chain_stats.drafted  # several branches were proposed


def depths(tree):
    depth = [0]
    for parent in tree.parents[1:]:
        depth.append(depth[parent] + 1)
    return depth


def test_ngram_trees_keep_to_their_widths_node_by_node():
    """On random contexts over 3 to 5 tokens, where the context's end recurs with many
    continuations, a node of an n-gram tree at depth d - 1 has as children the first w_d
    different next tokens of the branches (drafters.lookup_branches) through it, in their
    order: never more than w_d (nor any child below depth D), and the limit is reached often."""
    from gpt2_numpy.drafters import lookup_branches

    rng, cut = np.random.default_rng(3), 0
    for V in (3, 4, 5):
        for _ in range(8):
            tokens = rng.integers(0, V, 40).tolist()
            for widths in [(1,), (2,), (3, 1), (2, 2, 2), (4, 3, 2, 1), (3, 3), (1, 2, 3)]:
                tree = ngram_tree(NGramDrafter(V), tokens, widths)
                branches = lookup_branches(tokens, int(np.prod(widths)), len(widths))
                assert tree.n_nodes <= tree_size(widths)
                for node, depth in enumerate(depths(tree)):
                    children = [tree.tokens[c] for c in tree.children[node]]
                    if depth == len(widths):
                        assert children == []
                        continue
                    path = [tree.tokens[i] for i in path_to(tree.parents, node)[1:]]
                    through = [b[depth] for b in branches if b[:depth] == path]
                    assert children == list(dict.fromkeys(through))[: widths[depth]]
                    cut += len(set(through)) > widths[depth]
    assert cut > 100


def test_an_ngram_tree_near_the_end_of_the_context_fits_the_rows_left(target):
    """Near the end of the context a round's tree is cut to the rows left: 58 prompt tokens
    leave 6 rows, so widths 2, 2, 2 become 2, 2. The prompt's last token, 9, was followed by
    7 8, 4 6, 4 5 and 1 3: the root may take 7 and 4 (5 nodes); a third child, 1, would make 7
    nodes and overflow the KV cache. The run must reach the full context with the target's
    greedy tokens."""
    from gpt2_numpy.drafters import lookup_branches

    filler = [20 + i % 30 for i in range(43)]  # no 9, and no earlier "21 9" or "20 21 9"
    prompt = filler + [9, 1, 3, 9, 4, 5, 9, 4, 6, 9, 7, 8] + [20, 21, 9]
    room = target.n_ctx - len(prompt)
    assert room == 6 and tree_size((2, 2)) == 6
    assert lookup_branches(prompt, 4, 2) == [[7, 8], [4, 6], [4, 5], [1, 3]]
    ar, _ = autoregressive_sample(target, prompt, room)
    ids, stats = tree_speculative_sample(target, NGramDrafter(target.n_vocab), prompt, 100,
                                         (2, 2, 2))
    assert ids == ar and stats.stopped_at_context and stats.K_per_round[0] == 5


@pytest.mark.parametrize("bad", [[], [0], [2, -1], [2.5], [8, 8]])
def test_bad_widths_are_clear_errors(target, drafts, bad):
    with pytest.raises(gpt2.GPT2Error, match="widths"):
        tree_speculative_sample(target, drafts["often"], PROMPT, 5, bad)
    assert tree_size([8, 7]) == MAX_TREE_NODES  # the largest two-level tree allowed


# --- the multi-candidate rule and the draws without replacement, exactly -----------------------
# As test_sampling's test_one_step_output_distribution_is_exactly_p: the code is driven with
# scripted u, each decision checked on both sides of its threshold, and the output's law summed
# exactly from the written-out thresholds and residuals. The functions are imported from tree.py,
# where a node's rule is used.

def reference_without(q, x):
    """q less token x, renormalised (all zeros once q's support is used up)."""
    q = q.copy()
    q[x] = 0.0
    return q / q.sum() if q.sum() > 0 else q


def draws_without_replacement(q, w):
    """Every ordered tuple that w draws without replacement from q can give (min(w, nonzeros of
    q) tokens), with its probability: the product over the draws of the drawn token's mass in q
    less the tokens drawn before it, renormalised. Yields (tokens, laws it was drawn from, prob)."""
    n = min(w, int(np.count_nonzero(q)))

    def grow(tokens, laws, law, prob):
        if len(tokens) == n:
            yield tokens, laws, prob
            return
        for x in np.flatnonzero(law):
            x = int(x)
            yield from grow(tokens + [x], laws + [law], reference_without(law, x), prob * law[x])

    yield from grow([], [], q, 1.0)


def law_of_accept_one_of(children, q, p):
    """The exact law of accept_one_of's output token for these children (q: the law they were
    drawn from without replacement, None: chosen without sampling), read off the code: child j
    is accepted for u below a_j = min(1, p_j(x_j) / q_j(x_j)) (u just below accepts, u == a_j
    rejects: the script of every path so far rejects with u == a), after every rejection the
    token drawn from the last residual is the one whose interval of its CDF holds u. p_j is the
    residual norm(max(0, p_{j-1} - q_{j-1})), q_j is q less x_1..x_{j-1} (one-hot at x_j for
    q None); written out here, not taken from the code."""
    out, reach, rejections = np.zeros(len(p)), 1.0, []
    p_j, q_left = p, q
    for j, x in enumerate(children):
        q_j = q_left if q is not None else np.eye(len(p))[x]
        a = min(1.0, p_j[x] / q_j[x])
        if a > 0:
            rng = ScriptedRng(*rejections, np.nextafter(a, 0))
            assert accept_one_of(children, q, p, rng) == (j, x) and not rng.values
        out[x] += reach * a
        reach *= 1 - a
        if reach == 0:  # child j is always accepted: nothing after it is ever reached
            return out
        rejections.append(a)
        p_j = reference_residual(p_j, q_j)
        if q is not None:
            q_left = reference_without(q_left, x)
    ends = np.cumsum(p_j)  # token t is resampled for u in [ends[t] - p_j[t], ends[t])
    for token in np.flatnonzero(p_j):
        for at in (1e-6, 0.5, 1 - 1e-6):  # fractions of the way through the interval
            rng = ScriptedRng(*rejections, ends[token] - (1 - at) * p_j[token])
            assert accept_one_of(children, q, p, rng) == (None, token) and not rng.values
    return out + reach * p_j


def node_pair(kind, V=6):
    """(p, q) at a node: the target's distribution and the draft's, with the zeros asked for."""
    rng = np.random.default_rng(zlib.crc32(kind.encode()))
    p, q = rng.dirichlet(np.ones(V)), rng.dirichlet(np.ones(V))
    if kind == "zeros in p and q":
        p[[0, 1]], q[[1, 2]] = 0.0, 0.0  # token 1: zero in both
    elif kind == "p == q":
        q = p.copy()
    elif kind == "one-hot p":
        p = np.eye(V)[4]
    elif kind == "one-hot p outside q":
        p, q[4] = np.eye(V)[4], 0.0
    return p / p.sum(), q / q.sum()


NODE_KINDS = ["random", "zeros in p and q", "p == q", "one-hot p", "one-hot p outside q"]


@pytest.mark.parametrize("w", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("kind", NODE_KINDS)
def test_a_node_with_sampled_children_outputs_exactly_p(kind, w):
    """Children drawn without replacement from q (every ordered tuple, with its probability),
    then accept_one_of over them: the output's law, summed over the tuples, is p."""
    p, q = node_pair(kind)
    out, total = np.zeros(len(p)), 0.0
    for children, _, prob in draws_without_replacement(q, w):
        out += prob * law_of_accept_one_of(children, q, p)
        total += prob
    assert total == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(out, p, rtol=0, atol=1e-12)


DETERMINISTIC = {  # (p, children) for children chosen without sampling (q None)
    "p .4 .3 .2 .1, children 0 1": ([0.4, 0.3, 0.2, 0.1], [0, 1]),  # a forgotten residual: .567
    "p .4 .3 .2 .1, children 3 2 1 0": ([0.4, 0.3, 0.2, 0.1], [3, 2, 1, 0]),
}


def deterministic_cases():
    cases = dict(DETERMINISTIC)
    rng = np.random.default_rng(7)
    for kind, p_kind in (("random", "p random"), ("zeros in p and q", "zeros in p"),
                         ("one-hot p", "one-hot p")):
        for w in range(1, 6):
            cases[f"{p_kind}, {w} children"] = (node_pair(kind)[0], rng.permutation(6)[:w].tolist())
    return cases


@pytest.mark.parametrize("case", deterministic_cases())
def test_a_node_with_deterministic_children_outputs_exactly_p(case):
    """Children chosen without sampling (n-gram matches, top-w at temperature 0): each one's q
    is one-hot at it, so child j is accepted with probability p_j(x_j), p_j the residual left by
    the rejections before it. The law is p for any children, tokens of p = 0 among them too."""
    p, children = deterministic_cases()[case]
    p = np.asarray(p)
    np.testing.assert_allclose(law_of_accept_one_of(children, None, p), p, rtol=0, atol=1e-12)


@pytest.mark.parametrize("w", [1, 3, 5])
@pytest.mark.parametrize("kind", ["random", "zeros in p and q", "one-hot p outside q"])
def test_draws_without_replacement_have_the_renormalised_q_s_law(kind, w):
    """sample_without_replacement(q, w): min(w, nonzeros of q) distinct tokens, the tuple
    x_1..x_n drawn with probability q(x_1) q_2(x_2) ... q_n(x_n), q_j being q less x_1..x_{j-1},
    renormalised. Read off the code with scripted u: each tuple's set of u is a box whose sides
    are the intervals of the drawn tokens in the CDFs of q_1..q_n, and the code must give that
    tuple at its middle and near both ends of every side."""
    q = node_pair(kind)[1]
    low, high, total = 1e-6, 1 - 1e-6, 0.0
    for tokens, laws, prob in draws_without_replacement(q, w):
        ends = [np.cumsum(law)[x] for law, x in zip(laws, tokens)]
        n = len(tokens)
        for point in [(0.5,) * n, (low,) * n, (high,) * n, (low, high) * n, (high, low) * n]:
            u = [end - (1 - at) * law[x] for end, at, law, x in zip(ends, point, laws, tokens)]
            assert sample_without_replacement(q, w, ScriptedRng(*u)) == tokens
        assert prob == pytest.approx(np.prod([law[x] for law, x in zip(laws, tokens)]), rel=1e-12)
        total += prob
    assert total == pytest.approx(1.0, abs=1e-12)  # the boxes fill [0, 1)^n


# --- a drafter's mistakes at a node are errors, never acceptances --------------------------------

def test_a_node_names_a_drafters_repeated_or_impossible_child():
    """A repeated child, or one its q (less the children before it) gives no mass, is the
    drafter's mistake: a GPT2Error naming it, whatever u is, never a silent acceptance
    (q(x) = 0 would make p / q 0/0 = NaN, and min(1, NaN) is 1)."""
    p, q = np.array([0.1, 0.0, 0.6, 0.3]), np.array([0.5, 0.5, 0.0, 0.0])
    for u in (0.0, 0.5, np.nextafter(1.0, 0)):
        for children, law in (([0, 0], q), ([1, 1], None), ([3, 2, 3], None)):
            with pytest.raises(gpt2.GPT2Error, match=f"proposed token {children[-1]} twice as "
                                                     "children of one node"):
                accept_one_of(children, law, p, ScriptedRng(0.99, 0.99, u))
        for children, j in (([2], 1), ([0, 2], 2), ([1, 0, 3], 3)):
            with pytest.raises(gpt2.GPT2Error, match=f"proposed token {children[-1]} as child {j} "
                                                     "of a node but its q gives it probability 0"):
                accept_one_of(children, q, p, ScriptedRng(*[0.99] * (j - 1), u))


def test_a_tree_run_whose_draft_repeats_a_child_stops_with_the_error(monkeypatch, target, drafts):
    """A draft sampler that draws WITH replacement (here: its top token, twice) gives a node a
    repeated child; the run stops with the GPT2Error that names it once the walk reaches it."""
    from gpt2_numpy import tree

    monkeypatch.setattr(tree, "sample_without_replacement",
                        lambda q, n, rng: [int(np.argmax(q))] * n)
    with pytest.raises(gpt2.GPT2Error, match="twice as children of one node"):
        tree_speculative_sample(target, drafts["rarely"], PROMPT, 20, (2, 2), Warp(1.0),
                                np.random.default_rng(0))


# --- a tree's host work -------------------------------------------------------------------------

def test_top_w_is_the_full_sorts_answer_with_ties_to_the_lowest_id():
    """tree.top_w (a partial sort) gives what sorting the whole row does: the w largest logits,
    largest first, equal logits lowest id first (the greedy argmax's tie rule), on rows full of
    ties, at the boundary of the w too."""
    from gpt2_numpy.tree import top_w

    row = np.array([1, 3, 3, -2, 3, 0, 1], dtype=np.float32)
    assert [top_w(row, w) for w in (1, 2, 3, 4, 5)] == [[1], [1, 2], [1, 2, 4], [1, 2, 4, 0],
                                                        [1, 2, 4, 0, 6]]
    assert top_w(row, 7) == top_w(row, 9) == [1, 2, 4, 0, 6, 5, 3]
    rng = np.random.default_rng(0)
    for V in (1, 2, 5, 50, 1000):
        for ties in (True, False):
            for _ in range(10):
                row = rng.integers(-3, 4, V) if ties else rng.standard_normal(V)
                row = row.astype(np.float32)
                row[rng.integers(0, V)] = -np.inf  # a masked logit
                for w in sorted({1, 2, 3, 8, V - 1, V, V + 1} - {0}):
                    assert top_w(row, w) == np.argsort(-row, kind="stable")[:w].tolist(), (V, w)


class FakeClock:
    """Seconds that pass only where a test moves them on."""

    now = 0.0

    def __call__(self):
        return self.now


class Slow:
    """A model whose every forward moves a fake clock on by `cost` seconds."""

    def __init__(self, model, clock, cost):
        self.model, self.clock, self.cost = model, clock, cost
        self.n_ctx, self.n_vocab, self.new_cache = model.n_ctx, model.n_vocab, model.new_cache

    def __call__(self, *args, **kwargs):
        self.clock.now += self.cost
        return self.model(*args, **kwargs)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_tree_runs_draft_seconds_count_choosing_the_children(monkeypatch, target, drafts,
                                                               temperature):
    """On a fake clock that moves only in the forwards (1 s a target forward, 0.25 s a draft
    forward) and in choosing a node's children (0.5 s: a top-w or draws without replacement,
    each over the whole vocabulary), the run's draft_seconds are the draft's forwards and the
    choosing, its target_seconds the verify forwards, and the two add up to its decode_seconds.
    No wall clock is read."""
    import time

    from gpt2_numpy import tree
    from gpt2_numpy.stats import Timed

    clock = FakeClock()
    monkeypatch.setattr(time, "perf_counter", clock)  # Stats.timing's clock
    monkeypatch.setattr(tree, "Timed", lambda fn: Timed(fn, clock=clock))
    choose, chosen = tree.draw_children, []

    def slow_choice(*args):
        clock.now += 0.5
        chosen.append(args[1])
        return choose(*args)

    monkeypatch.setattr(tree, "draw_children", slow_choice)
    ids, stats = tree_speculative_sample(Slow(target, clock, 1.0),
                                         Slow(drafts["often"], clock, 0.25), PROMPT, 20,
                                         (2, 2, 1), Warp(temperature), np.random.default_rng(0))
    assert len(ids) == 20 and len(chosen) > stats.rounds  # several nodes' children a round
    assert stats.target_seconds == 1.0 * stats.target_calls
    assert stats.draft_seconds == 0.25 * stats.draft_calls + 0.5 * len(chosen)
    assert stats.draft_seconds + stats.target_seconds == stats.decode_seconds


# --- the sampled law, end to end ---------------------------------------------------------------

TREE_STATISTICAL = {  # draft, warp, widths: ragged where top-k/top-p leave fewer tokens than w
    "unrelated, T=1, (2, 2)": ("unrelated", Warp(1.0), (2, 2)),
    "unrelated, top_k=3, (3, 1)": ("unrelated", Warp(1.2, top_k=3), (3, 1)),
    "near, top_k=2, (4, 2)": ("near", Warp(0.8, top_k=2), (4, 2)),
    "near, top_p=0.8, (2, 3)": ("near", Warp(1.3, top_p=0.8), (2, 3)),
    "near, T=1, (4,)": ("near", Warp(1.0), (4,)),
}


def tree_samples(case, N=4000, n=2):
    """The first n tokens of N seeded tree runs on a 4-token vocabulary, with their law under the
    target and under the draft (enumerated), and the runs' acceptance."""
    kind, warp, widths = TREE_STATISTICAL[case]
    target = tiny_model(seed=21, scale=1.0, **TINY)
    draft = perturbed(target, 0.2) if kind == "near" else tiny_model(seed=5, scale=1.0, **TINY)
    prompt = [1, 2]
    rng = np.random.default_rng(99)
    samples, drafted, accepted = [], 0, 0
    for _ in range(N):
        ids, stats = tree_speculative_sample(target, draft, prompt, n, widths, warp, rng)
        samples.append(tuple(ids))
        drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
    p_exact = exact_distribution(target, prompt, n, warp)
    q_exact = exact_distribution(draft, prompt, n, warp)
    return samples, p_exact, q_exact, accepted / drafted


@pytest.mark.parametrize("case", TREE_STATISTICAL)
def test_tree_samples_follow_the_exact_target_distribution(case):
    """As the chain's test: the first two tokens' empirical law passes a chi-square test at
    significance 1e-4 and a total-variation bound against the target's enumerated law, and fails
    them against the draft's. With 4 tokens and up to 4 children per node, siblings would
    often coincide if drawn with replacement; top-k and top-p make the trees ragged."""
    samples, p_exact, q_exact, acceptance = tree_samples(case)
    N = len(samples)
    assert total_variation(p_exact, q_exact) > 0.1  # a meaningful test
    assert all(p_exact[s] > 0 for s in samples)
    chi2, critical, tv, tv_bound = goodness_of_fit(samples, p_exact, N)
    assert chi2 < critical and tv < tv_bound, (chi2, critical, tv, tv_bound)
    assert 0.05 < acceptance < 0.8  # both acceptances and rejections shaped the law
    chi2_q, critical_q, tv_q, _ = goodness_of_fit(samples, q_exact, N)
    assert chi2_q > critical_q and tv_q > tv_bound


NGRAM_PROMPT = [2, 0, 1, 3, 1, 0, 2, 0, 1, 1, 0, 1]  # "0 1" was followed by 3, 1 and 1 0, 2 0
NGRAM_STATISTICAL = {"T=1, (3, 2)": (Warp(1.0), (3, 2)),
                     "top_k=3, (3, 2, 1)": (Warp(0.9, top_k=3), (3, 2, 1))}


@pytest.mark.parametrize("case", NGRAM_STATISTICAL)
def test_ngram_tree_samples_follow_the_exact_target_distribution(case):
    """Trees of n-gram matches (children chosen without sampling, each q one-hot) on a prompt
    whose end recurs with several continuations: the root gets three children and a child of it
    two. The first three tokens' empirical law passes chi-square (significance 1e-4) and a
    total-variation bound against the target's enumerated law, and fails both against a nearby
    wrong law (the same warp at 1.5 times the temperature)."""
    warp, widths = NGRAM_STATISTICAL[case]
    target = tiny_model(seed=21, scale=1.0, **{**TINY, "n_ctx": 32})  # room for whole trees
    n, N = 3, 4000
    first = ngram_tree(NGramDrafter(4), NGRAM_PROMPT, widths)
    assert len(first.children[0]) == 3
    assert max(len(first.children[c]) for c in first.children[0]) == 2
    p_exact = exact_distribution(target, NGRAM_PROMPT, n, warp)
    wrong = exact_distribution(target, NGRAM_PROMPT, n, Warp(1.5 * warp.temperature, warp.top_k))
    assert total_variation(p_exact, wrong) > 0.1  # a meaningful test
    rng = np.random.default_rng(2024)
    samples, first_rounds = [], {"accepted": 0, "resampled": 0}
    for _ in range(N):
        kinds = []
        ids, stats = tree_speculative_sample(target, NGramDrafter(4), NGRAM_PROMPT, n, widths,
                                             warp, rng, lambda ids, k: kinds.append(k[0]))
        samples.append(tuple(ids))
        first_rounds[kinds[0]] += 1  # the first round's tree is `first`: accepted at the root?
    assert min(first_rounds.values()) > N / 10  # both the acceptances and the residual, often
    assert all(p_exact[s] > 0 for s in samples)
    chi2, critical, tv, tv_bound = goodness_of_fit(samples, p_exact, N)
    assert chi2 < critical and tv < tv_bound, (chi2, critical, tv, tv_bound)
    chi2_w, critical_w, tv_w, _ = goodness_of_fit(samples, wrong, N)
    assert chi2_w > critical_w and tv_w > tv_bound


# --- main.py --tree -----------------------------------------------------------------------------

@pytest.mark.parametrize("flags", [["--tree", "2,2,2,2"], ["--tree", "3,1,2", "--mode", "all"],
                                   ["--tree", "3,2,1", "--draft", "ngram"]])
def test_cli_greedy_tree_gives_the_autoregressive_tokens(capsys, flags):
    import main
    from test_cli import BASE, REPETITIVE, strict_loads

    assert main.main(BASE + ["--json", "--prompt", REPETITIVE, *flags]) == 0
    r = strict_loads(capsys.readouterr().out)
    sp = r["speculative"]
    assert r["same_tokens"] is True and len(sp["token_ids"]) == 17
    assert r["tree"] == [int(w) for w in flags[1].split(",")] and "predicted_speedup" not in r
    assert sp["tokens_per_round"] == 17 / sp["rounds"] and sp["target_calls"] == sp["rounds"]
    assert max(sp["K_per_round"]) <= tree_size(r["tree"])
    assert len(sp["accepted_histogram"]) == len(r["tree"]) + 1  # 0..depth drafts kept a round
    assert main.main(BASE + ["--prompt", REPETITIVE, *flags]) == 0
    assert "Same tokens = yes" in capsys.readouterr().out


@pytest.mark.parametrize("tree, message", [
    ("0", "integers >= 1"), ("2,-1", "integers >= 1"), ("2.5", "integers separated by commas"),
    ("2,,2", "integers separated by commas"), ("a", "integers separated by commas"),
    ("8,8", "more than the limit of 64"), ("8,7", "positions the context has left")])
def test_cli_bad_widths_exit_2_with_one_line(capsys, tree, message):
    import main
    from test_cli import BASE

    assert main.main(BASE + ["--tree", tree]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


@pytest.mark.parametrize("flags", [["--mode", "autoregressive"], ["--adaptive"]])
def test_cli_tree_with_flags_it_does_not_go_with(capsys, flags):
    import main
    from test_cli import BASE

    assert main.main(BASE + ["--tree", "2,2", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--tree" in err and "\n" not in err


# --- the GPU twin: on tests/fake_cupy.py always, on a GPU when there is one -----------------------

from test_cupy import gpu  # noqa: E402,F401  (the fixture: fake CuPy, fused or not; a real GPU)


def test_trees_on_the_gpu_twin_give_the_cpus_logits_and_tokens(gpu):
    """A tree forward on CuPy arrays (the fused path falls back to model.forward) gives the
    CPU's logits; greedy tree decoding gives the CPU's tokens; the gather runs on the device."""
    import cupy

    cpu = gpt2.load_model(str(FIXTURES / "tiny-4h"), download=False)
    dev = gpu.load_model(str(FIXTURES / "tiny-4h"), download=False)
    draft = gpu.load_model(str(FIXTURES / "tiny-3h"), download=False)
    tokens = np.random.default_rng(2).integers(0, cpu.n_vocab, len(PARENTS)).tolist()
    want = feed_tree(cpu, tokens, cpu.new_cache(20), PARENTS)
    cache = dev.new_cache(20)
    got = feed_tree(dev, tokens, cache, PARENTS)
    np.testing.assert_allclose(cupy.asnumpy(got), want, atol=1e-4, rtol=0)
    keep(cache, 1, [1, 5, 9])
    assert cache.length == 4 and isinstance(cache.k, cupy.ndarray)
    prompt = cpu.tokenizer.encode("the model is learning the")
    ar, _ = gpt2.autoregressive_sample(cpu, prompt, 30)
    ids, stats = gpu.tree_speculative_sample(dev, draft, prompt, 30, (2, 2, 1))
    assert ids == ar and stats.target_calls == stats.rounds


def test_the_benchmarks_round_cost_is_the_chains_formula_for_a_chain():
    """bench/tree.py's cost of a round: K draft steps and an r(K + 1) verify for a chain; one
    draft forward per depth over the nodes above it for a tree."""
    from bench.tree import draft_rows, round_cost, shapes

    r = lambda T: 1 + 0.1 * (T - 1)  # noqa: E731
    for K in (1, 4, 7):
        assert round_cost((1,) * K, r, r, 0.3) == pytest.approx(K * 0.3 + r(K + 1))
    assert draft_rows((2, 3, 1)) == [1, 2, 6]
    assert round_cost((2, 3, 1), r, r, 0.3) == pytest.approx(0.3 * (r(1) + r(2) + r(6)) + r(15))
    assert round_cost((9,), r, lambda T: None, 0.3) is None  # an unmeasured cost: no prediction
    seven = shapes(7)
    assert (1,) * 7 in seven and (2, 2) in seven and (2, 3) not in seven  # non-increasing
    assert all(tree_size(s) <= 7 for s in seven) and len(set(seven)) == len(seven)
