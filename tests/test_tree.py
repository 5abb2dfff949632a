"""Token trees: the tree forward against chains, the gather against a fresh prefill, greedy
trees against greedy decoding, and the sampled law against the target's exact one."""
import numpy as np
import pytest

import gpt2_numpy as gpt2
from gpt2_numpy import NGramDrafter, Warp, autoregressive_sample, speculative_sample
from gpt2_numpy.model import causal_mask, tree_mask
from gpt2_numpy.tree import MAX_TREE_NODES, accept_one_of, tree_size, tree_speculative_sample
from conftest import FIXTURES, perturbed, tiny_model
from test_decoding import (N_GREEDY, PROMPT, TINY, exact_distribution, goodness_of_fit,
                           total_variation)
from test_sampling import ScriptedRng

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
    visible = tree_mask(n_before, len(PARENTS), np, PARENTS)
    assert visible.shape == (len(PARENTS), n_before + len(PARENTS))
    for i in range(len(PARENTS)):
        seen = {j - n_before for j in np.flatnonzero(visible[i]) if j >= n_before}
        assert seen == set(path_to(PARENTS, i)) and visible[i, :n_before].all()
    chain = list(range(-1, 6))
    np.testing.assert_array_equal(tree_mask(4, 7, np, chain), causal_mask(4, 7, np))


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
            rows.append(target([tokens[i] for i in level], cache, n_logits=None,
                               parents=PARENTS[: level[-1] + 1]))
        logits = np.concatenate(rows)
    else:
        logits = target(tokens, cache, n_logits=None, parents=PARENTS)  # [N, V]
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
    target(tokens, cache, n_logits=0, parents=PARENTS)
    path = path_to(PARENTS, 10)  # rows 0, 2, 6, 10
    cache.keep(len(PROMPT), path)
    fresh = target.new_cache(32)
    target(PROMPT + [tokens[i] for i in path], fresh, n_logits=0)
    assert cache.length == fresh.length == len(PROMPT) + len(path)
    n = fresh.length
    np.testing.assert_allclose(cache.k[:, :, :n], fresh.k[:, :, :n], atol=1e-5, rtol=0)
    np.testing.assert_allclose(cache.v[:, :, :n], fresh.v[:, :, :n], atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        cache.keep(2, [3, 1])  # not ascending


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

    def __call__(self, ids, cache, n_logits=1, parents=None):
        return self.model(ids, cache, n_logits, parents)


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


@pytest.mark.parametrize("bad", [[], [0], [2, -1], [2.5], [8, 8]])
def test_bad_widths_are_clear_errors(target, drafts, bad):
    with pytest.raises(gpt2.GPT2Error, match="widths"):
        tree_speculative_sample(target, drafts["often"], PROMPT, 5, bad)
    assert tree_size([8, 7]) == MAX_TREE_NODES  # the largest two-level tree allowed


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
    want = cpu(tokens, cpu.new_cache(20), n_logits=None, parents=PARENTS)
    cache = dev.new_cache(20)
    got = dev(tokens, cache, n_logits=None, parents=PARENTS)
    np.testing.assert_allclose(cupy.asnumpy(got), want, atol=1e-4, rtol=0)
    cache.keep(1, [1, 5, 9])
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
