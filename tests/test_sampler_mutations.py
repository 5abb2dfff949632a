"""Each classic mistake in a speculative sampler, patched in on purpose, makes a named exactness
test fail (tests/test_parity.py does the same for the forward pass).

A mistake is a small function that patches the package: a step of accept_or_resample, the
residual, the warp or the draft's sampling swapped for a wrong one, or a rollback dropped. For
each mistake CAUGHT_BY lists tests of test_sampling.py and test_decoding.py, and each of them
must fail with an AssertionError once the mistake is in, or with the rule's own guard: the
GPT2Error that names a drafter's token its q gives no mass (any other crash does not count).
Where a mistake needs a test-local copy of a function, the same copy without the mistake must
pass every test that is listed anywhere (the "no mistake" case), so a failure is the mistake's
doing.
"""
import sys

import numpy as np
import pytest

import test_decoding
import test_sampling
from gpt2_numpy import GPT2Error, Warp, decoding, sampling
from gpt2_numpy.backend import to_numpy
from gpt2_numpy.model import KVCache


def patch_everywhere(mp, original, replacement):
    """Replace a function in every module of the package and of the tests that holds it (the
    tests import functions by name, so patching sampling.py alone would miss their copies)."""
    for module in list(sys.modules.values()):
        name = getattr(module, "__name__", "") or ""
        if name.startswith(("gpt2_numpy", "test_")):
            for attr, value in list(vars(module).items()):
                if value is original:
                    mp.setattr(module, attr, replacement)


# --- test-local copies of the sampler's steps, with one step swappable -----------------------

def accept_or_resample_with(ratio=lambda p, q: p / q, resample=None, bonus_row=lambda K: K,
                            bonus=True):
    """sampling.accept_or_resample written out again; the defaults are the right rule."""
    resample = resample or (lambda p, q: sampling.residual(p, q))

    def accept_or_resample(drafts, q, p, rng):
        for i, x in enumerate(drafts):
            if rng.random() < min(1.0, ratio(p[i, x], q[i, x])):
                continue
            return i, sampling.sample(resample(p[i], q[i]), rng)
        if not bonus and drafts:  # the last accepted draft ends the round: nothing more is drawn
            return len(drafts) - 1, drafts[-1]
        return len(drafts), sampling.sample(p[bonus_row(len(drafts))], rng)

    return accept_or_resample


def residual_q_minus_p(p, q):
    r = np.maximum(q - p, 0.0)
    return r / r.sum() if r.sum() > 1e-12 else p


def residual_not_renormalised(p, q):
    r = np.maximum(p - q, 0.0)
    return r if r.sum() > 1e-12 else p


def probabilities_top_p_first(original):
    """probabilities() with the nucleus chosen on the untempered distribution."""

    def probabilities(logits, warp):
        if warp.greedy or warp.top_p is None:
            return original(logits, warp)
        keep = original(logits, Warp(1.0, warp.top_k, warp.top_p)) > 0  # top-p at T = 1
        z = np.where(keep, np.asarray(logits, dtype=np.float64) / warp.temperature, -np.inf)
        p = np.exp(z - z.max(axis=-1, keepdims=True))  # one row or several, as the original
        return p / p.sum(axis=-1, keepdims=True)

    return probabilities


def propose_drawing_from(law):
    """ModelDrafter.propose written out again: q (for the ratio) is the warped law, and each
    draft is drawn from law(logits, warp, q_i) (the right one: q_i itself)."""

    def propose(self, tokens, K, warp, rng):
        drafts, q = [], np.empty((K, self.n_vocab))
        new = tokens[self.cache.length :]
        for i in range(K):
            logits = to_numpy(self.forward(new, self.cache))  # [1, V]
            q[i] = sampling.probabilities(logits[-1], warp)
            drafts.append(sampling.sample(law(logits[-1], warp, q[i]), rng))
            new = drafts[-1:]
        return drafts, q

    return propose


def without_the_warp(logits, warp, q_i):  # softmax(logits / T): no top-k, no top-p
    return sampling.probabilities(logits, Warp(warp.temperature))


def propose_without_top_k(self, tokens, K, warp, rng):
    """ModelDrafter.propose with q (and the draws from it) left without the warp's top-k: the
    output stays exact (x_i ~ q_i still holds), only acceptance suffers."""
    return faithful_propose(self, tokens, K, Warp(warp.temperature, None, warp.top_p)
                            if not warp.greedy else warp, rng)


faithful_propose = propose_drawing_from(lambda logits, warp, q_i: q_i)


def no_target_rollback(mp):
    """Target caches never roll back; the draft's ModelDrafter.rollback still does."""
    real = KVCache.rollback
    mp.setattr(KVCache, "rollback", lambda cache, length: None)
    mp.setattr(decoding.ModelDrafter, "rollback",
               lambda self, tokens: real(self.cache, min(self.cache.length, len(tokens) - 1)))


def faithful_copies(mp):
    patch_everywhere(mp, sampling.accept_or_resample, accept_or_resample_with())
    mp.setattr(decoding.ModelDrafter, "propose", propose_drawing_from(lambda logits, warp, q_i: q_i))


MISTAKES = {
    "no mistake (the test-local copies, unchanged)": faithful_copies,
    "accept with q/p": lambda mp: patch_everywhere(
        mp, sampling.accept_or_resample,
        accept_or_resample_with(ratio=lambda p, q: q / p if p > 0 else np.inf)),
    "residual max(q - p)": lambda mp: patch_everywhere(mp, sampling.residual, residual_q_minus_p),
    "residual not renormalised": lambda mp: patch_everywhere(mp, sampling.residual,
                                                             residual_not_renormalised),
    "resample from p instead of the residual": lambda mp: patch_everywhere(
        mp, sampling.accept_or_resample, accept_or_resample_with(resample=lambda p, q: p)),
    "bonus from row K - 1": lambda mp: patch_everywhere(
        mp, sampling.accept_or_resample, accept_or_resample_with(bonus_row=lambda K: K - 1)),
    "no bonus": lambda mp: patch_everywhere(mp, sampling.accept_or_resample,
                                            accept_or_resample_with(bonus=False)),
    "the draft samples without the warp the ratio uses": lambda mp: mp.setattr(
        decoding.ModelDrafter, "propose", propose_drawing_from(without_the_warp)),
    "top-p applied before temperature": lambda mp: patch_everywhere(
        mp, sampling.probabilities, probabilities_top_p_first(sampling.probabilities)),
    "target cache not rolled back": no_target_rollback,
    "draft cache not rolled back": lambda mp: mp.setattr(decoding.ModelDrafter, "rollback",
                                                         lambda self, tokens: None),
    "draft cache rolled back one token too far": lambda mp: mp.setattr(
        decoding.ModelDrafter, "rollback",
        lambda self, tokens: self.cache.rollback(min(self.cache.length, len(tokens) - 2))),
    "the draft's q without the warp's top-k": lambda mp: mp.setattr(
        decoding.ModelDrafter, "propose", propose_without_top_k),
}

# The exactness tests, called as pytest calls them (fixtures passed in by hand).
TESTS = {
    "test_one_step_output_distribution_is_exactly_p[random]":
        lambda fx: test_sampling.test_one_step_output_distribution_is_exactly_p("random"),
    "test_residual_is_normalised_and_falls_back_to_p":
        lambda fx: test_sampling.test_residual_is_normalised_and_falls_back_to_p(),
    "test_rows_line_up_with_draft_positions":
        lambda fx: test_sampling.test_rows_line_up_with_draft_positions(),
    "test_warping_equals_a_written_out_reference[T=0.7, top_k=12, top_p=0.8]":
        lambda fx: test_sampling.test_warping_equals_a_written_out_reference(
            Warp(0.7, top_k=12, top_p=0.8)),
    "test_greedy_speculative_equals_greedy_autoregressive[always, K=4]":
        lambda fx: test_decoding.test_greedy_speculative_equals_greedy_autoregressive(
            *fx, "always", 4),
    "test_caches_hold_exactly_the_committed_prefix_after_every_round[T=1]":
        lambda fx: test_decoding.test_caches_hold_exactly_the_committed_prefix_after_every_round(
            *fx, 1.0),
    "test_the_draft_samples_from_the_very_q_it_returns[T=1.2, top_k=10, top_p=0.6]":
        lambda fx: test_decoding.test_the_draft_samples_from_the_very_q_it_returns(
            fx[1], Warp(1.2, top_k=10, top_p=0.6)),
    "test_speculative_samples_follow_the_exact_target_distribution[T=1.5,top_k,top_p]":
        lambda fx: test_decoding.test_speculative_samples_follow_the_exact_target_distribution(
            "T=1.5,top_k,top_p"),
    "test_the_drafts_q_is_the_warped_distribution_of_the_drafts_logits[T=0.8, top_k=3]":
        lambda fx: test_decoding.test_the_drafts_q_is_the_warped_distribution_of_the_drafts_logits(
            fx[1], Warp(0.8, top_k=3)),
}
ONE_STEP, RESIDUAL, ROWS, WARPING, GREEDY, CACHES, DRAFT_Q, LAW, WARPED_Q = TESTS

CAUGHT_BY = {
    "accept with q/p": [ONE_STEP, LAW],
    "residual max(q - p)": [RESIDUAL, ONE_STEP],
    # The decoder's output is unchanged (sample() scales u by the total mass): only the
    # residual's own test can see this one.
    "residual not renormalised": [RESIDUAL],
    "resample from p instead of the residual": [ONE_STEP, LAW],
    "bonus from row K - 1": [ROWS, GREEDY],
    "no bonus": [ROWS, GREEDY],
    "the draft samples without the warp the ratio uses": [DRAFT_Q, LAW],
    "top-p applied before temperature": [WARPING, LAW],
    "target cache not rolled back": [CACHES],
    "draft cache not rolled back": [CACHES],
    # Still exact (the draft only refeeds a token): only the bookkeeping test can see it.
    "draft cache rolled back one token too far": [CACHES],
    # Still exact too (x_i ~ q_i holds): only comparing q with the warped logits sees it.
    "the draft's q without the warp's top-k": [WARPED_Q],
}
CONTROL = "no mistake (the test-local copies, unchanged)"
CASES = [(mistake, test) for mistake, tests in CAUGHT_BY.items() for test in tests]
CONTROLS = sorted({test for tests in CAUGHT_BY.values() for test in tests})


def fails(test, fixtures):
    """Runs a listed test and checks that it failed: an AssertionError, or the acceptance rule's
    guard naming a drafter's mistake (a token drawn from another law than the q it returned)."""
    with pytest.raises((AssertionError, GPT2Error)) as caught:
        test(fixtures)
    if caught.errisinstance(GPT2Error):
        assert "a drafter must propose tokens drawn from the q it returns" in str(caught.value)


def test_every_listed_mistake_has_a_test_that_catches_it():
    assert set(CAUGHT_BY) == set(MISTAKES) - {CONTROL} and all(CAUGHT_BY.values())


@pytest.mark.parametrize("test", CONTROLS)
def test_the_copies_without_a_mistake_pass(target, drafts, monkeypatch, test):
    MISTAKES[CONTROL](monkeypatch)
    TESTS[test]((target, drafts))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # p / q with q = 0: a mistake's doing
@pytest.mark.parametrize("mistake, test", CASES)
def test_each_sampler_mistake_is_caught(target, drafts, monkeypatch, mistake, test):
    MISTAKES[mistake](monkeypatch)
    fails(TESTS[test], (target, drafts))


# === Token trees (gpt2_numpy/tree.py) ==========================================================
# The same scheme for the tree's own mistakes, caught by tests of test_tree.py: the forward's
# mask and positions, the multi-candidate rule's two updates after a rejected sibling (for
# sampled children and for children chosen without sampling), the n-gram tree's widths, the
# gather that keeps the accepted path, and the row the bonus is drawn from.

import test_tree  # noqa: E402
from gpt2_numpy import drafters, tree  # noqa: E402


def accept_one_of_with(update_p=True, update_q=True, update_p_without_q=True):
    """tree.accept_one_of written out again; the defaults are the right rule.
    update_p_without_q=False forgets the residual only for children chosen without sampling."""

    def accept_one_of(children, q, p, rng):
        for j, x in enumerate(children):
            q_j = q if q is not None else np.eye(1, len(p), x)[0]
            if rng.random() < min(1.0, p[x] / q_j[x]):
                return j, x
            if update_p and (q is not None or update_p_without_q):
                p = sampling.residual(p, q_j)
            if update_q and q is not None:
                q = tree.without(q, x)
        return None, sampling.sample(p, rng)

    return accept_one_of


def walk_with(bonus_row=lambda node: node):
    """tree.walk written out again, the bonus drawn from p[bonus_row(leaf)]."""

    def walk(t, logits, warp, rng):
        node, path = 0, []
        while t.children[node]:
            children = t.children[node]
            p = sampling.probabilities(logits[node], warp)
            j, x = tree.accept_one_of([t.tokens[c] for c in children], t.q[node], p, rng)
            if j is None:
                return path, x, "resampled"
            node = children[j]
            path.append(node)
        p = sampling.probabilities(logits[bonus_row(node)], warp)
        return path, sampling.sample(p, rng), "bonus" if t.n_nodes else "target"

    return walk


def ngram_tree_with(extra=0):
    """drafters.ngram_tree written out again, a node full at w + extra children (0: the right rule)."""

    def ngram_tree(drafter, tokens, widths):
        t = tree.Tree(tokens[-1])
        n_leaves = int(np.prod(widths)) if len(widths) else 0
        for branch in (drafters.lookup_branches(tokens, n_leaves, len(widths), drafter.n_max)
                       if n_leaves else []):
            node = 0
            for token, w in zip(branch, widths):
                same = [c for c in t.children[node] if t.tokens[c] == token]
                if not same and len(t.children[node]) == w + extra:
                    break
                node = same[0] if same else t.add(node, token)
        return t

    return ngram_tree


def siblings_visible(mp):
    """Every tree row sees every row before it, as in a chain: siblings and cousins too."""
    original = tree.tree_mask
    patch_everywhere(mp, original, lambda n_before, parents:
                     original(n_before, list(range(-1, len(parents) - 1))))


def positions_by_row(mp):
    patch_everywhere(mp, tree.tree_positions, lambda n_before, parents:
                     n_before + np.arange(len(parents)))


def faithful_tree_copies(mp):
    patch_everywhere(mp, tree.accept_one_of, accept_one_of_with())
    mp.setattr(tree, "walk", walk_with())
    patch_everywhere(mp, drafters.ngram_tree, ngram_tree_with())


TREE_MISTAKES = {
    "no mistake (the test-local copies, unchanged)": faithful_tree_copies,
    "a sibling visible to a sibling": siblings_visible,
    "position = row index": positions_by_row,
    "residual not updated after a rejected sibling": lambda mp: patch_everywhere(
        mp, tree.accept_one_of, accept_one_of_with(update_p=False)),
    "q not updated after a rejected sibling": lambda mp: patch_everywhere(
        mp, tree.accept_one_of, accept_one_of_with(update_q=False)),
    "residual not updated after a rejected child chosen without sampling (q None)":
        lambda mp: patch_everywhere(mp, tree.accept_one_of,
                                    accept_one_of_with(update_p_without_q=False)),
    "an n-gram tree's node with one child more than its width": lambda mp: patch_everywhere(
        mp, drafters.ngram_tree, ngram_tree_with(extra=1)),
    "the wrong rows gathered (a chain's rollback)": lambda mp: patch_everywhere(
        mp, tree.keep, lambda cache, length, path: cache.rollback(length + len(path))),
    "the bonus from the row before the leaf's": lambda mp: mp.setattr(
        tree, "walk", walk_with(bonus_row=lambda node: node - 1)),
}

TREE_TESTS = {
    "test_each_node_gets_the_logits_of_its_path_fed_alone_as_a_chain[one forward]":
        lambda fx: test_tree.test_each_node_gets_the_logits_of_its_path_fed_alone_as_a_chain(
            fx[0], False),
    "test_each_node_gets_the_logits_of_its_path_fed_alone_as_a_chain[a level at a time]":
        lambda fx: test_tree.test_each_node_gets_the_logits_of_its_path_fed_alone_as_a_chain(
            fx[0], True),
    "test_greedy_tree_equals_greedy_autoregressive[(2, 2, 2, 2)-often]":
        lambda fx: test_tree.test_greedy_tree_equals_greedy_autoregressive(
            *fx, "often", (2, 2, 2, 2)),
    "test_both_caches_hold_exactly_the_committed_prefix_after_every_round[(2, 2, 2)-1.0]":
        lambda fx: test_tree.test_both_caches_hold_exactly_the_committed_prefix_after_every_round(
            *fx, 1.0, (2, 2, 2)),
    "test_tree_samples_follow_the_exact_target_distribution[unrelated, T=1, (2, 2)]":
        lambda fx: test_tree.test_tree_samples_follow_the_exact_target_distribution(
            "unrelated, T=1, (2, 2)"),
    "test_tree_samples_follow_the_exact_target_distribution[near, top_k=2, (4, 2)]":
        lambda fx: test_tree.test_tree_samples_follow_the_exact_target_distribution(
            "near, top_k=2, (4, 2)"),
    "test_a_node_with_sampled_children_outputs_exactly_p[zeros in p and q-3]":
        lambda fx: test_tree.test_a_node_with_sampled_children_outputs_exactly_p(
            "zeros in p and q", 3),
    "test_a_node_with_deterministic_children_outputs_exactly_p[p .4 .3 .2 .1, children 0 1]":
        lambda fx: test_tree.test_a_node_with_deterministic_children_outputs_exactly_p(
            "p .4 .3 .2 .1, children 0 1"),
    "test_ngram_tree_samples_follow_the_exact_target_distribution[T=1, (3, 2)]":
        lambda fx: test_tree.test_ngram_tree_samples_follow_the_exact_target_distribution(
            "T=1, (3, 2)"),
    "test_ngram_trees_keep_to_their_widths_node_by_node":
        lambda fx: test_tree.test_ngram_trees_keep_to_their_widths_node_by_node(),
}
(NODES, NODES_BY_LEVEL, TREE_GREEDY, TREE_CACHES, TREE_LAW, TREE_LAW_TOP_K, NODE_LAW,
 NODE_LAW_WITHOUT_Q, NGRAM_LAW, NGRAM_WIDTHS) = TREE_TESTS

TREE_CAUGHT_BY = {
    "a sibling visible to a sibling": [NODES, NODES_BY_LEVEL, TREE_GREEDY],
    "position = row index": [NODES, NODES_BY_LEVEL, TREE_GREEDY],
    "residual not updated after a rejected sibling": [TREE_LAW, TREE_LAW_TOP_K, NODE_LAW,
                                                      NODE_LAW_WITHOUT_Q],
    "q not updated after a rejected sibling": [TREE_LAW, NODE_LAW],
    "residual not updated after a rejected child chosen without sampling (q None)": [
        NODE_LAW_WITHOUT_Q, NGRAM_LAW],
    "an n-gram tree's node with one child more than its width": [NGRAM_WIDTHS],
    "the wrong rows gathered (a chain's rollback)": [TREE_CACHES, TREE_GREEDY],
    "the bonus from the row before the leaf's": [TREE_GREEDY],
}
TREE_CASES = [(mistake, test) for mistake, tests in TREE_CAUGHT_BY.items() for test in tests]
TREE_CONTROLS = sorted({test for tests in TREE_CAUGHT_BY.values() for test in tests})


def test_every_listed_tree_mistake_has_a_test_that_catches_it():
    assert set(TREE_CAUGHT_BY) == set(TREE_MISTAKES) - {CONTROL} and all(TREE_CAUGHT_BY.values())


@pytest.mark.parametrize("test", TREE_CONTROLS)
def test_the_tree_copies_without_a_mistake_pass(target, drafts, monkeypatch, test):
    TREE_MISTAKES[CONTROL](monkeypatch)
    TREE_TESTS[test]((target, drafts))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("mistake, test", TREE_CASES)
def test_each_tree_mistake_is_caught(target, drafts, monkeypatch, mistake, test):
    TREE_MISTAKES[mistake](monkeypatch)
    fails(TREE_TESTS[test], (target, drafts))


# --- Medusa heads as a tree's drafter: which head drafts a depth, and which q judges it --------

import test_medusa_tree  # noqa: E402
from gpt2_numpy.medusa import MedusaHeads  # noqa: E402


def medusa_draft_with(drawn_by=lambda d: d, judged_by=lambda d: d):
    """MedusaHeads.draft written out again: depth d + 1's children drawn from head drawn_by(d)
    + 1 and judged against head judged_by(d) + 1's q (the defaults are the right rule)."""

    def draft(self, tokens, widths, warp, rng):
        t = tree.Tree(tokens[-1])
        if self.h is None or not widths:
            return t
        self.calls += 1
        logits = self.logits(self.h[None, :], self.wte)[:, 0, :]  # [H, V]
        H, level = len(logits), [0]
        for d, w in enumerate(widths):
            drawn, judged = logits[drawn_by(d) % H], logits[judged_by(d) % H]
            q = None if warp.greedy else sampling.probabilities(drawn, warp)
            for node in level:
                t.q[node] = None if warp.greedy else sampling.probabilities(judged, warp)
                for token in (tree.top_w(drawn, w) if warp.greedy
                              else tree.sample_without_replacement(q, w, rng)):
                    t.add(node, token)
            level = [c for node in level for c in t.children[node]]
        return t

    return draft


MEDUSA_MISTAKES = {
    CONTROL: lambda mp: mp.setattr(MedusaHeads, "draft", medusa_draft_with()),
    "a head's q for the wrong depth (depth d drafted by head d + 1)": lambda mp: mp.setattr(
        MedusaHeads, "draft", medusa_draft_with(drawn_by=lambda d: d + 1,
                                                judged_by=lambda d: d + 1)),
    "children judged against another head's q": lambda mp: mp.setattr(
        MedusaHeads, "draft", medusa_draft_with(judged_by=lambda d: d + 1)),
}


def with_own_monkeypatch(test, *args):
    with pytest.MonkeyPatch.context() as mp:
        test(*args, mp)


MEDUSA_TESTS = {
    "test_depth_d_children_come_from_head_d_at_the_last_accepted_node[greedy]":
        lambda fx: with_own_monkeypatch(
            test_medusa_tree.test_depth_d_children_come_from_head_d_at_the_last_accepted_node,
            fx, Warp(0.0)),
    "test_depth_d_children_come_from_head_d_at_the_last_accepted_node[top_k]":
        lambda fx: with_own_monkeypatch(
            test_medusa_tree.test_depth_d_children_come_from_head_d_at_the_last_accepted_node,
            fx, Warp(1.0, top_k=20)),
    "test_medusa_tree_samples_follow_the_exact_target_distribution[T=1, (2, 2)]":
        lambda fx: test_medusa_tree.test_medusa_tree_samples_follow_the_exact_target_distribution(
            "T=1, (2, 2)"),
    "test_medusa_tree_samples_follow_the_exact_target_distribution[top_k=3, (3, 1)]":
        lambda fx: test_medusa_tree.test_medusa_tree_samples_follow_the_exact_target_distribution(
            "top_k=3, (3, 1)"),
}
MEDUSA_GREEDY_HEAD, MEDUSA_SAMPLED_HEAD, MEDUSA_LAW, MEDUSA_LAW_TOP_K = MEDUSA_TESTS
MEDUSA_CAUGHT_BY = {
    # Still exact (each child is judged against the q it was drawn from): only the test that
    # compares a depth's children with head d's guesses can see it.
    "a head's q for the wrong depth (depth d drafted by head d + 1)": [MEDUSA_GREEDY_HEAD,
                                                                       MEDUSA_SAMPLED_HEAD],
    # (At top_k = 3 with three children, every token of the support is drawn: the wrong q then
    # changes the law too little for 3000 runs to see, so MEDUSA_LAW_TOP_K is no witness.)
    "children judged against another head's q": [MEDUSA_LAW, MEDUSA_SAMPLED_HEAD],
}
MEDUSA_CASES = [(mistake, test) for mistake, tests in MEDUSA_CAUGHT_BY.items() for test in tests]


@pytest.fixture(scope="module")
def medusa_target():
    return test_medusa_tree.gpt2.load_model(str(test_medusa_tree.TINY_4H), progress=False)


@pytest.mark.parametrize("test", sorted({t for tests in MEDUSA_CAUGHT_BY.values() for t in tests}))
def test_the_medusa_copy_without_a_mistake_passes(medusa_target, monkeypatch, test):
    MEDUSA_MISTAKES[CONTROL](monkeypatch)
    MEDUSA_TESTS[test](medusa_target)


@pytest.mark.parametrize("mistake, test", MEDUSA_CASES)
def test_each_medusa_mistake_is_caught(medusa_target, monkeypatch, mistake, test):
    MEDUSA_MISTAKES[mistake](monkeypatch)
    fails(MEDUSA_TESTS[test], medusa_target)
