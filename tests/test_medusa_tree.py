"""Medusa heads as a token tree's drafter (gpt2_numpy/medusa/heads.py, tree.py): depth d's
children come from head d at the last accepted node, greedy trees give the target's greedy text,
the sampled law is the target's exactly, heads trained by the command draft more tokens per
target forward than untrained ones, the command line's refusals, and the GPU twin."""
import subprocess
import sys

import numpy as np
import pytest

import gpt2_numpy as gpt2
from gpt2_numpy import MedusaHeads, Warp, autoregressive_sample, tree_speculative_sample
from gpt2_numpy.tree import top_w
from conftest import FIXTURES, ROOT, tiny_model
from test_decoding import TINY, exact_distribution, goodness_of_fit, total_variation

TINY_4H = FIXTURES / "tiny-4h"  # a genuine checkpoint with random weights, 307 tokens


def random_heads(target, n_heads, scale, seed=0):
    """Heads whose guesses differ from the LM head's (W != 0), for a target of any shape."""
    heads = MedusaHeads.untrained(target, n_heads)
    rng = np.random.default_rng(seed)
    heads.W[:] = scale * rng.standard_normal(heads.W.shape)
    heads.b[:] = scale * rng.standard_normal(heads.b.shape)
    return heads


@pytest.fixture(scope="module")
def target():
    return gpt2.load_model(str(TINY_4H), progress=False)


def prompts(target, n=6, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, target.n_vocab, 6).tolist() for _ in range(n)]


class Recorder:
    """Wraps the heads' draft to keep every tree it returns."""

    def __init__(self, heads):
        self.heads, self.trees, self.lengths = heads, [], []
        self.draft = heads.draft

    def __call__(self, tokens, *args):
        self.lengths.append(len(tokens))  # the committed tokens, the root the last of them
        self.trees.append(self.draft(tokens, *args))
        return self.trees[-1]


@pytest.mark.parametrize("warp", [Warp(0.0), Warp(1.0, top_k=20)], ids=["greedy", "top_k"])
def test_depth_d_children_come_from_head_d_at_the_last_accepted_node(target, warp,
                                                                     monkeypatch):
    """Every tree after the first: the nodes of depth d - 1 have their children from head d at
    the hidden state of the token before the root (the last node the walk accepted, fed in the
    verify before): its top-w greedily, else drawn from its warped q, which is tree.q there."""
    heads = random_heads(target, 3, 0.3)
    recorder = Recorder(heads)
    monkeypatch.setattr(heads, "draft", recorder)
    tokens = prompts(target)[0]
    ids, _ = tree_speculative_sample(target, heads, tokens, 30, (3, 2, 1), warp,
                                     np.random.default_rng(0))
    committed = tokens + ids
    assert recorder.trees[0].n_nodes == 0  # no row to read yet: a plain target step
    wte = np.asarray(target.params["wte"])
    assert sum(tree.n_nodes > 0 for tree in recorder.trees) > 5
    for tree, length in zip(recorder.trees, recorder.lengths):
        if not tree.n_nodes:
            continue  # the first round, and the last token: nothing to draft
        # The row the heads read: the token before the root, its prefix fed as a chain.
        h = target.hidden_states(committed[: length - 1], target.new_cache(len(committed)))[0]
        logits = heads.logits(h[None], wte)[:, 0]  # [H, V]
        depth = {0: 0}
        for node in range(1, len(tree.tokens)):
            depth[node] = depth[tree.parents[node]] + 1
        for node, children in enumerate(tree.children):
            if not children:
                continue
            d = depth[node] + 1  # its children's depth: head d drafts them
            if warp.greedy:
                assert tree.q[node] is None
                assert [tree.tokens[c] for c in children] == top_w(logits[d - 1], len(children))
            else:
                q = gpt2.probabilities(logits[d - 1], warp)
                np.testing.assert_allclose(tree.q[node], q, rtol=1e-4, atol=1e-9)
                assert all(q[tree.tokens[c]] > 0 for c in children)


@pytest.mark.parametrize("widths", [(1,), (1, 1, 1), (2, 2, 1), (3, 1), (1, 3, 2)], ids=str)
def test_greedy_medusa_trees_give_the_targets_greedy_text(target, widths):
    heads = random_heads(target, 3, 0.3)
    for tokens in prompts(target, 4):
        ar, _ = autoregressive_sample(target, tokens, 30)
        ids, stats = tree_speculative_sample(target, heads, tokens, 30, widths)
        assert ids == ar and stats.n_generated == 30
        assert stats.target_calls == stats.rounds
        assert stats.draft_calls == stats.rounds - 2  # every round but the first and the last


def medusa_samples(warp, widths, N, n=4, seed=99):
    """The first n tokens of N seeded runs on a 4-token vocabulary with random heads, and the
    target's enumerated law."""
    target = tiny_model(seed=21, scale=1.0, **{**TINY, "n_ctx": 32})
    heads = random_heads(target, len(widths), 0.8, seed=3)
    prompt = [1, 2]
    rng = np.random.default_rng(seed)
    samples, drafted, accepted = [], 0, 0
    for _ in range(N):
        ids, stats = tree_speculative_sample(target, heads, prompt, n, widths, warp, rng)
        samples.append(tuple(ids))
        drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
    return target, prompt, samples, accepted / drafted


MEDUSA_STATISTICAL = {"T=1, (2, 2)": (Warp(1.0), (2, 2)),
                      "top_k=3, (3, 1)": (Warp(0.9, top_k=3), (3, 1))}


@pytest.mark.parametrize("case", MEDUSA_STATISTICAL)
def test_medusa_tree_samples_follow_the_exact_target_distribution(case):
    """The first four tokens (round 1 is a plain step; rounds 2.. draft from the heads) pass
    chi-square (significance 1e-4) and a total-variation bound against the target's enumerated
    law, and fail both against a nearby wrong law (the same warp at 1.5 times the
    temperature)."""
    warp, widths = MEDUSA_STATISTICAL[case]
    target, prompt, samples, acceptance = medusa_samples(warp, widths, N=3000)
    p_exact = exact_distribution(target, prompt, 4, warp)
    wrong = exact_distribution(target, prompt, 4, Warp(1.5 * warp.temperature, warp.top_k))
    assert total_variation(p_exact, wrong) > 0.1  # a meaningful test
    assert 0.05 < acceptance < 0.9  # acceptances and rejections both shaped the law
    assert all(p_exact[s] > 0 for s in samples)
    chi2, critical, tv, tv_bound = goodness_of_fit(samples, p_exact, len(samples))
    assert chi2 < critical and tv < tv_bound, (chi2, critical, tv, tv_bound)
    chi2_w, critical_w, tv_w, _ = goodness_of_fit(samples, wrong, len(samples))
    assert chi2_w > critical_w and tv_w > tv_bound


# --- heads trained by the command -------------------------------------------------------------


def test_heads_trained_by_the_command_draft_more_tokens_per_target_forward(target, tmp_path):
    """`python -m gpt2_numpy.medusa train` on text the target writes greedily after six prompts
    (each written twice, so that the held-out share still leaves every prompt's text to train
    on), then greedy decoding of the same prompts: the target's own tokens, and more tokens per
    target forward than untrained heads give, above 1.2. The heads have seen these
    continuations: on a random tiny model, there is nothing else to learn (docs/medusa.md)."""
    starts = prompts(target, 6)
    file = tmp_path / "prompts.txt"
    file.write_text("\n".join(target.tokenizer.decode(p) for p in starts) + "\n")
    out = tmp_path / "heads.npz"
    r = subprocess.run([sys.executable, "-m", "gpt2_numpy.medusa", "train", "--model",
                        str(TINY_4H), "--prompts", str(file), "--temperature", "0", "--tokens",
                        str(12 * 48), "--length", "48", "--heads", "3", "--epochs", "60",
                        "--lr", "1e-2", "--out", str(out), "--no_progress"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    trained, untrained = MedusaHeads.load(out), MedusaHeads.untrained(target, 3)
    per_forward = {}
    for name, heads in (("trained", trained), ("untrained", untrained)):
        n = rounds = 0
        for text in file.read_text().splitlines():
            tokens = target.tokenizer.encode(text)
            ar, _ = autoregressive_sample(target, tokens, 36)
            ids, stats = tree_speculative_sample(target, heads, tokens, 36, (1, 1, 1))
            assert ids == ar
            n, rounds = n + stats.n_generated, rounds + stats.rounds
        per_forward[name] = n / rounds
    assert per_forward["trained"] > max(1.2, per_forward["untrained"]), per_forward


# --- the command line -----------------------------------------------------------------------------


def main_py(*flags):
    return subprocess.run([sys.executable, "main.py", "--target_model_size", str(TINY_4H),
                           "--prompt", "the cat sat on the", "--n_tokens_to_generate", "12",
                           "--no_progress", *flags], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def heads_file(target, tmp_path_factory):
    path = tmp_path_factory.mktemp("heads") / "heads.npz"
    random_heads(target, 3, 0.3).save(path)
    return path


def test_main_py_drafts_with_heads(heads_file):
    r = main_py("--draft", "medusa", "--heads", str(heads_file), "--tree", "2,1", "--json")
    assert r.returncode == 0, r.stderr
    import json

    report = json.loads(r.stdout)
    assert report["draft"] == "medusa" and report["tree"] == [2, 1] and report["same_tokens"]
    chain = json.loads(main_py("--draft", "medusa", "--heads", str(heads_file), "--json").stdout)
    assert chain["tree"] == [1, 1, 1]  # without --tree: one candidate per head


@pytest.mark.parametrize("flags, message", [
    (["--draft", "medusa"], "--draft medusa needs --heads FILE"),
    (["--draft", "medusa", "--heads", "{missing}"], "no Medusa heads file"),
    (["--draft", "medusa", "--heads", "{corrupt}"], "is not a readable Medusa heads file"),
    (["--draft", "medusa", "--heads", "{heads}", "--tree", "1,1,1,1"], "has 3 heads"),
    (["--draft", "medusa", "--heads", "{heads}", "--adaptive"], "--adaptive does not go with"),
    (["--draft", "medusa", "--heads", "{heads}", "--K", "2"], "--K does not go with"),
    (["--draft", "medusa", "--heads", "{heads}", "--mode", "all"], "it needs --draft model"),
    (["--heads", "{heads}"], "--heads is for --draft medusa"),
    (["--draft", "medusa", "--heads", "{heads}", "--target_model_size",
      str(FIXTURES / "tiny-3h")], "made for a model of"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_heads_are_one_error_line(flags, message, heads_file, tmp_path):
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(heads_file.read_bytes()[:100])
    paths = {"missing": tmp_path / "missing.npz", "corrupt": corrupt, "heads": heads_file}
    r = main_py(*[f.format(**paths) for f in flags])
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert message in r.stderr


# --- the GPU twin: on tests/fake_cupy.py always, on a GPU when there is one -------------------

from test_cupy import gpu  # noqa: E402,F401  (the fixture: fake CuPy, fused or not; a real GPU)


def test_heads_draft_for_a_target_on_the_gpu_twin(gpu, target):
    """The target on CuPy arrays (its hidden states from model.py's forward), the heads on the
    host: greedy decoding gives the CPU's tokens."""
    dev = gpu.load_model(str(TINY_4H), download=False)
    heads = random_heads(target, 3, 0.3)
    tokens = prompts(target)[1]
    ar, _ = autoregressive_sample(target, tokens, 24)
    ids, stats = gpu.tree_speculative_sample(dev, heads, tokens, 24, (2, 1, 1))
    assert ids == ar and stats.target_calls == stats.rounds
