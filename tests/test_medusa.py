"""Medusa heads (gpt2_numpy/medusa/): every gradient against central finite differences, Adam
against a hand computation, training on the tiny fixture target, the heads file, the command.

MISTAKES at the end patches each classic mistake of a hand-written backward pass, optimiser and
file writer into the package, and checks that the tests listed for it fail with an
AssertionError.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

import gpt2_numpy as gpt2
from gpt2_numpy import GPT2Error, MedusaHeads, Warp
from gpt2_numpy.medusa import __main__ as command
from gpt2_numpy.medusa import heads as medusa
from gpt2_numpy.medusa import train as training
from gpt2_numpy.medusa.heads import (Adam, cross_entropy, cross_entropy_backward, head_forward,
                                     lm_head_backward, loss_and_gradients, silu, silu_grad)
from gpt2_numpy.medusa.train import (Sequence, evaluate, rows, sequence_lengths, split, train,
                                     write_sequence, write_text)
from gpt2_numpy.model import lm_head
from gpt2_numpy.sampling import probabilities
from conftest import FIXTURES, ROOT, tiny_model

TINY = FIXTURES / "tiny-4h"  # a genuine checkpoint with random weights, 307 tokens, n_embd 32


@pytest.fixture(scope="module")
def target():
    return gpt2.load_model(str(TINY), progress=False)


# --- Gradients against central finite differences, in float64 on a tiny shape -----------------

EPS = 1e-6  # float64: truncation ~EPS^2, rounding ~1e-16 / EPS, both far below the tolerance


def problem(seed=0):
    """W, b, h, targets, wte of a tiny shape in float64: N 6 rows, d 4, V 7, H 3 heads. W and b
    are far from zero (SiLU' is then not 1/2 everywhere); some targets are missing (-1), and head
    3 has none at all."""
    rng = np.random.default_rng(seed)
    N, d, V, H = 6, 4, 7, 3
    W, b = rng.standard_normal((H, d, d)), rng.standard_normal((H, d))
    h, wte = rng.standard_normal((N, d)), 2 * rng.standard_normal((V, d))
    targets = rng.integers(V, size=(N, H + 1))
    targets[-1, 1:] = -1
    targets[-2, 2] = -1
    targets[:, 3] = -1
    return W, b, h, targets, wte


def numerical_gradient(f, x):
    """d f / d x by central differences, one entry of x at a time (x is changed and restored)."""
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        saved = x[i]
        x[i] = saved + EPS
        up = f()
        x[i] = saved - EPS
        down = f()
        x[i] = saved
        g[i] = (up - down) / (2 * EPS)
    return g


def assert_close(analytic, numerical):
    assert analytic.shape == numerical.shape
    np.testing.assert_allclose(analytic, numerical, rtol=1e-6, atol=1e-8)


def test_cross_entropy_gradient():
    rng = np.random.default_rng(1)
    logits, y = 3 * rng.standard_normal((5, 7)), rng.integers(7, size=5)
    _, probs = cross_entropy(logits, y)
    numerical = numerical_gradient(lambda: cross_entropy(logits, y)[0], logits)
    assert_close(cross_entropy_backward(probs, y), numerical)


def test_gradient_through_the_tied_lm_head():
    rng = np.random.default_rng(2)
    z, wte = rng.standard_normal((5, 4)), 2 * rng.standard_normal((7, 4))
    y = rng.integers(7, size=5)
    _, probs = cross_entropy(lm_head(z, wte), y)
    numerical = numerical_gradient(lambda: cross_entropy(lm_head(z, wte), y)[0], z)
    assert_close(lm_head_backward(cross_entropy_backward(probs, y), wte), numerical)


def test_silu_gradient():
    u = np.array([-30.0, -4.0, -1.3, -0.2, 0.0, 0.4, 1.0, 2.5, 8.0])
    numerical = (silu(u + EPS) - silu(u - EPS)) / (2 * EPS)
    assert_close(silu_grad(u), numerical)


def test_gradients_of_W_and_b():
    W, b, h, targets, wte = problem()
    loss, losses, dW, db = loss_and_gradients(W, b, h, targets, wte)
    assert_close(dW, numerical_gradient(lambda: loss_and_gradients(W, b, h, targets, wte)[0], W))
    assert_close(db, numerical_gradient(lambda: loss_and_gradients(W, b, h, targets, wte)[0], b))
    assert np.all(dW[2] == 0) and np.all(db[2] == 0) and losses[2] == 0  # head 3: no rows


def test_the_whole_loss_and_its_gradient_along_random_directions():
    W, b, h, targets, wte = problem(seed=3)
    loss, losses, dW, db = loss_and_gradients(W, b, h, targets, wte)
    # The loss is what it says: each head's mean cross-entropy over its rows, summed, here
    # written out with a log-sum-exp in float64.
    expected = 0.0
    for k in (1, 2):
        rows_k = targets[:, k] >= 0
        z = h[rows_k] + silu(h[rows_k] @ W[k - 1] + b[k - 1])
        logits = z @ wte.T
        top = logits.max(axis=1)
        log_z = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
        expected += np.mean(log_z - logits[np.arange(rows_k.sum()), targets[rows_k, k]])
    assert loss == pytest.approx(expected, rel=1e-12) and loss == pytest.approx(sum(losses))
    rng = np.random.default_rng(4)
    for _ in range(3):  # the directional derivative along (vW, vb), both parameters at once
        vW, vb = rng.standard_normal(W.shape), rng.standard_normal(b.shape)
        up = loss_and_gradients(W + EPS * vW, b + EPS * vb, h, targets, wte)[0]
        down = loss_and_gradients(W - EPS * vW, b - EPS * vb, h, targets, wte)[0]
        analytic = np.sum(dW * vW) + np.sum(db * vb)
        assert analytic == pytest.approx((up - down) / (2 * EPS), rel=1e-6, abs=1e-8)


def test_adam_matches_a_hand_computation():
    theta = np.array([1.0, -2.0])
    adam = Adam([theta], lr=0.1, b1=0.9, b2=0.999, eps=1e-8)
    # Step 1, g = (0.5, -3): m = 0.1 g, v = 0.001 g^2, so m^ = g, v^ = g^2 and each entry moves
    # by lr g / (|g| + eps), i.e. lr against the sign of its gradient.
    adam.step([np.array([0.5, -3.0])])
    np.testing.assert_allclose(theta, [1 - 0.1 * 0.5 / (0.5 + 1e-8), -2 + 0.1 * 3 / (3 + 1e-8)],
                               rtol=1e-15)
    # Step 2, g = (-1, 2): m = 0.9 (0.05, -0.3) + 0.1 (-1, 2) = (-0.055, -0.07);
    # v = 0.999 (0.00025, 0.009) + 0.001 (1, 4) = (0.00124975, 0.012991);
    # m^ = m / (1 - 0.81) = (-0.2894737, -0.3684211);
    # v^ = v / (1 - 0.998001) = (0.6251876, 6.4987494);
    # theta = (0.9, -1.9) - 0.1 m^ / sqrt(v^) = (0.9 + 0.0366104, -1.9 + 0.0144521).
    adam.step([np.array([-1.0, 2.0])])
    np.testing.assert_allclose(adam.m[0], [-0.055, -0.07], rtol=1e-12)
    np.testing.assert_allclose(adam.v[0], [0.00124975, 0.012991], rtol=1e-12)
    np.testing.assert_allclose(theta, [0.9366104, -1.8855479], atol=1e-7)


# --- The heads' forward and their distributions ------------------------------------------------


def random_heads(target, n_heads=3, scale=0.3, seed=0):
    rng = np.random.default_rng(seed)
    d = target.hparams["n_embd"]
    return MedusaHeads(scale * rng.standard_normal((n_heads, d, d)),
                       scale * rng.standard_normal((n_heads, d)), target.hparams, target.name)


def hidden_of(target, text="the cat sat on the mat"):
    ids = target.tokenizer.encode(text)
    return target.hidden_states(ids, target.new_cache(len(ids)), n_rows=None)  # [T, d]


def test_untrained_heads_score_like_the_lm_head(target):
    h, wte = hidden_of(target), target.params["wte"]
    heads = MedusaHeads.untrained(target, 3)
    logits = heads.logits(h, wte)  # [3, T, V]
    assert logits.shape == (3, len(h), target.n_vocab)
    for k in range(3):  # equal up to float32 rounding: 3T rows are multiplied, not T
        np.testing.assert_allclose(logits[k], lm_head(h, wte), rtol=1e-5, atol=1e-5)
    warp = Warp(0.8, top_k=20)
    np.testing.assert_allclose(heads.q(h[-1], wte, warp),
                               np.repeat(probabilities(lm_head(h[-1:], wte), warp), 3, axis=0),
                               rtol=1e-4, atol=1e-7)


def test_q_is_each_heads_own_warped_distribution(target):
    h, wte = hidden_of(target), target.params["wte"]
    heads = random_heads(target)
    logits = heads.logits(h[-1:], wte)[:, 0, :]  # [H, V]
    for k in range(heads.n_heads):  # head k's logits are its own layer's, then the tied head
        z, _ = head_forward(h[-1:], heads.W[k], heads.b[k])
        np.testing.assert_allclose(logits[k], lm_head(z, wte)[0], rtol=1e-5, atol=1e-5)
    assert len({int(np.argmax(row)) for row in logits}) > 1  # the heads disagree: a mix-up shows
    for warp in (Warp(1.0), Warp(0.7, top_k=5), Warp(1.2, top_p=0.9)):
        q = heads.q(h[-1], wte, warp)
        assert q.shape == (3, target.n_vocab) and q.dtype == np.float64
        np.testing.assert_allclose(q, probabilities(logits, warp))
        np.testing.assert_allclose(q.sum(axis=1), 1.0)
    assert np.all(np.count_nonzero(heads.q(h[-1], wte, Warp(0.7, top_k=5)), axis=1) == 5)
    greedy = heads.q(h[-1], wte, Warp(0.0))
    np.testing.assert_array_equal(np.argmax(greedy, axis=1), np.argmax(logits, axis=1))
    assert np.all(greedy.max(axis=1) == 1.0)


# --- The heads file ---------------------------------------------------------------------------


def test_save_and_load_round_trip_bit_for_bit(target, tmp_path):
    heads = random_heads(target, n_heads=2)
    path = tmp_path / "heads.npz"
    heads.save(path)
    loaded = MedusaHeads.load(path)
    assert loaded.W.tobytes() == heads.W.tobytes() and loaded.W.dtype == np.float32
    assert loaded.b.tobytes() == heads.b.tobytes() and loaded.b.shape == (2, 32)
    assert loaded.shape == {k: target.hparams[k] for k in medusa.SHAPE_KEYS}
    assert loaded.target == target.name
    with np.load(path, allow_pickle=False) as f:  # one plain .npz, no pickles, no wte
        assert set(f.files) == {"W", "b", "target", "n_layer", "n_head", "n_embd", "n_vocab",
                                "n_ctx"}
    loaded.check_fits(target)
    assert os.listdir(tmp_path) == ["heads.npz"]  # no temporary file left behind


def test_save_leaves_nothing_half_written(target, tmp_path, monkeypatch):
    path = tmp_path / "heads.npz"
    random_heads(target, seed=1).save(path)
    old = path.read_bytes()

    def savez_failing_midway(f, **arrays):
        f.write(b"PK\x03\x04 half of a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", savez_failing_midway)
    with pytest.raises(OSError):
        random_heads(target, seed=2).save(path)
    assert path.read_bytes() == old  # the earlier file, whole
    assert os.listdir(tmp_path) == ["heads.npz"]  # and no temporary file


def test_heads_for_another_shape_are_one_error(target):
    heads = random_heads(target)
    heads.check_fits(target)
    other = gpt2.load_model(str(FIXTURES / "tiny-3h"), progress=False)
    with pytest.raises(GPT2Error) as e:
        heads.check_fits(other)
    message = str(e.value)
    assert "n_embd 32" in message and "n_embd 24" in message and str(TINY) in message
    # the same width and vocabulary, one layer fewer: another model all the same
    shallower = tiny_model(n_vocab=307, n_embd=32, n_head=4, n_layer=2)
    with pytest.raises(GPT2Error, match="n_layer 3.*n_layer 2"):
        heads.check_fits(shallower)


def fields_of(target):
    heads = random_heads(target, n_heads=2)
    return dict(W=heads.W, b=heads.b, target=np.str_("tiny-4h"),
                **{k: np.int64(target.hparams[k]) for k in medusa.SHAPE_KEYS})


def savez(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def write_bad_file(kind, path, target):
    good = fields_of(target)
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("W = [[1, 2], [3, 4]]\n")
    elif kind == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(3000))
    elif kind == "truncated":
        savez(path, **good)
        path.write_bytes(path.read_bytes()[:2000])
    elif kind == "a flipped byte":
        savez(path, **good)
        data = bytearray(path.read_bytes())
        data[1000] ^= 0xFF  # inside W's bytes: the zip's CRC-32 no longer matches
        path.write_bytes(bytes(data))
    elif kind == "one .npy array":
        with open(path, "wb") as f:
            np.save(f, good["W"])
    elif kind == "no b":
        savez(path, **{k: v for k, v in good.items() if k != "b"})
    elif kind == "an extra key":
        savez(path, **good, wte=np.zeros((307, 32), np.float32))
    elif kind == "W of the wrong width":
        savez(path, **{**good, "W": np.zeros((2, 24, 24), np.float32)})
    elif kind == "b for fewer heads":
        savez(path, **{**good, "b": good["b"][:1]})
    elif kind == "a pickled W":
        savez(path, **{**good, "W": np.array([good["W"]], dtype=object)})
    elif kind == "a NaN":
        W = good["W"].copy()
        W[1, 2, 3] = np.nan
        savez(path, **{**good, "W": W})
    elif kind == "n_embd a float":
        savez(path, **{**good, "n_embd": np.float64(32)})
    elif kind == "target a number":
        savez(path, **{**good, "target": np.int64(3)})


BAD_FILES = ["missing", "empty", "text", "random bytes", "truncated", "a flipped byte",
             "one .npy array", "no b", "an extra key", "W of the wrong width",
             "b for fewer heads", "a pickled W", "a NaN", "n_embd a float", "target a number"]


@pytest.mark.parametrize("kind", BAD_FILES)
def test_a_bad_heads_file_is_one_error_naming_it(kind, target, tmp_path):
    path = tmp_path / "heads.npz"
    write_bad_file(kind, path, target)
    with pytest.raises(GPT2Error) as e:
        MedusaHeads.load(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_the_good_file_the_bad_ones_are_made_from_loads(target, tmp_path):
    path = tmp_path / "heads.npz"
    savez(path, **fields_of(target))
    assert MedusaHeads.load(path).n_heads == 2


# --- The training text ------------------------------------------------------------------------


def test_rows_by_hand():
    tokens = np.array([10, 11, 12, 13, 14])
    hidden = np.arange(4 * 2, dtype=np.float32).reshape(4, 2)  # rows n = 0..3: tokens 0..3
    h, targets = rows([Sequence(tokens, hidden, 2)], n_heads=2)
    np.testing.assert_array_equal(h, hidden)
    # Column k: the token at n + k + 1, unless past the end or among the 2 given tokens.
    np.testing.assert_array_equal(targets, [[-1, 12, 13],
                                            [12, 13, 14],
                                            [13, 14, -1],
                                            [14, -1, -1]])
    _, t = rows([Sequence(tokens, hidden, 0)], n_heads=1)  # a user's text: all of it guessed
    np.testing.assert_array_equal(t, [[11, 12], [12, 13], [13, 14], [14, -1]])


def test_written_text_keeps_the_hidden_state_of_every_fed_token(target):
    rng = np.random.default_rng(0)
    seq = write_sequence(target, target.tokenizer.encode("the cat"), 20, Warp(0.0), rng)
    assert len(seq.tokens) == 20 and seq.hidden.shape == (19, target.hparams["n_embd"])
    once = target.hidden_states(seq.tokens[:-1].tolist(), target.new_cache(19), n_rows=None)
    np.testing.assert_allclose(seq.hidden, once, rtol=1e-4, atol=1e-4)  # as one forward
    written = np.argmax(lm_head(seq.hidden, target.params["wte"]), axis=1)[seq.n_given - 1 :]
    np.testing.assert_array_equal(written, seq.tokens[seq.n_given :])  # greedy: row n -> n + 1


def test_text_is_cut_into_whole_sequences_and_held_out_whole(target):
    assert sequence_lengths(10, 4) == [4, 3, 3] and sequence_lengths(40, 64) == [20, 20]
    sequences = write_text(target, 100, 16, Warp(1.0), np.random.default_rng(0))
    assert [len(s.tokens) for s in sequences] == sequence_lengths(100, 16)
    assert sequences[0].tokens[0] == target.tokenizer.eot_token  # even sequences: a document
    training, held = split(sequences, 0.3, np.random.default_rng(1))
    assert len(held) == 2 and len(training) == 5
    ids = {id(s) for s in training} | {id(s) for s in held}
    assert ids == {id(s) for s in sequences}  # each sequence whole, on one side only
    training, held = split(sequences[:2], 0.9, np.random.default_rng(1))
    assert len(training) == 1 and len(held) == 1


def test_greedy_text_is_written_once_per_start(target):
    prompts = [target.tokenizer.encode(p) for p in ("the cat", "hello", "once upon")]
    sequences = write_text(target, 6 * 32, 32, Warp(0.0), np.random.default_rng(0), prompts)
    assert sequences[0] is sequences[3] and sequences[1] is sequences[4]  # the same text, once
    assert not np.array_equal(sequences[0].tokens, sequences[1].tokens)
    alone = write_text(target, 8 * 32, 32, Warp(0.0), np.random.default_rng(0))
    starts = [int(s.tokens[0]) for s in alone]
    assert target.tokenizer.eot_token not in starts  # one start would give one text, 4 times
    for i, j in [(i, j) for i in range(8) for j in range(i)]:
        assert (starts[i] == starts[j]) == (alone[i] is alone[j])


# --- Training on the tiny fixture -------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(target):
    """Heads trained on 8000 tokens the fixture writes at temperature 0.3 (at 1 its text two
    tokens ahead is close to noise: docs/medusa.md), scored on held-out sequences."""
    rng = np.random.default_rng(0)
    training, held = split(write_text(target, 8000, 64, Warp(0.3), rng), 0.1, rng)
    wte = np.asarray(target.params["wte"])
    h, targets = rows(training, 4)
    h_held, targets_held = rows(held, 4)
    heads = MedusaHeads.untrained(target, 4)
    before = evaluate(heads, h_held, targets_held, wte)
    losses = train(heads, h, targets, wte, epochs=4, lr=3e-3, batch_size=64, seed=0)
    return before, evaluate(heads, h_held, targets_held, wte), losses


def test_training_lowers_every_heads_held_out_loss(trained):
    before, after, losses = trained
    assert losses == sorted(losses, reverse=True)  # the training loss falls epoch by epoch
    assert after[0] == before[0]  # the LM head is the target's: untouched
    for k in range(1, 5):
        assert after[k]["rows"] > 500
        assert after[k]["loss"] < before[k]["loss"] - 1.0


def test_training_raises_the_heads_held_out_top1(trained):
    """Above the untrained heads' on average and for heads 2..4. Untrained head 1 guesses that
    the token at n + 2 repeats the one at n + 1, which this random model's text often does;
    whether training beats that guess depends on the seed (docs/medusa.md), so it is not
    asserted. Every head's top-3 rises."""
    before, after, _ = trained
    mean = lambda scores, key: np.mean([s[key] for s in scores[1:]])  # noqa: E731
    assert mean(after, "top1") > mean(before, "top1") + 0.02
    for k in range(2, 5):
        assert after[k]["top1"] > before[k]["top1"]
    for k in range(1, 5):
        assert after[k]["top"] > before[k]["top"]


def greedy_chain_tokens_per_forward(heads, sequences, wte):
    """An offline estimate for greedy text: a round at row m drafts head k's argmax for the token
    at m + k + 1 (k = 1..H, a chain), keeps the drafts up to the first wrong one, and emits them
    and one token of the target's own: 1 + a tokens for one target forward, then goes on from
    row m + 1 + a. Counted from the last given token while every head has a token to compare."""
    rounds = tokens_out = 0
    for tokens, hidden, n_given in sequences:
        guesses = np.argmax(heads.logits(hidden, wte), axis=-1)  # [H, L - 1]
        m = n_given - 1
        while m + 1 + heads.n_heads < len(tokens):
            a = 0
            while a < heads.n_heads and guesses[a, m] == tokens[m + a + 2]:
                a += 1
            rounds, tokens_out, m = rounds + 1, tokens_out + 1 + a, m + 1 + a
    return tokens_out / rounds


def test_heads_learn_the_greedy_continuations_they_are_trained_on(target):
    """On random weights nothing carries over to new text at temperature 0; what the heads can
    do is learn the target's greedy continuations of the prompts they will draft for. These are
    scores on the training text itself."""
    prompts = [target.tokenizer.encode(p) for p in
               ("the cat sat", "Alan Turing theorized that", "once upon a time", "hello world")]
    sequences = write_text(target, 4 * 64, 64, Warp(0.0), np.random.default_rng(0), prompts)
    wte = np.asarray(target.params["wte"])
    h, targets = rows(sequences, 4)
    heads = MedusaHeads.untrained(target, 4)
    before, chain_before = evaluate(heads, h, targets, wte), greedy_chain_tokens_per_forward(
        heads, sequences, wte)
    train(heads, h, targets, wte, epochs=60, lr=1e-2, batch_size=64, seed=0)
    after, chain_after = evaluate(heads, h, targets, wte), greedy_chain_tokens_per_forward(
        heads, sequences, wte)
    assert after[1]["top1"] > 0.5 > before[1]["top1"] + 0.2
    assert chain_after > max(1.5, chain_before + 0.3)


# --- The command ------------------------------------------------------------------------------


def run_command(*flags, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "gpt2_numpy.medusa", "train", *flags], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_the_command_end_to_end(target, tmp_path):
    out = tmp_path / "heads.npz"
    r = run_command("--model", str(TINY), "--tokens", "600", "--heads", "3", "--epochs", "2",
                    "--out", str(out), "--no_progress")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # no progress bars asked for, nothing else to say
    lines = r.stdout.splitlines()
    assert any("before" in line and "after" in line for line in lines)
    scores = {line.split(")")[0] + ")": line.split(")")[1].split() for line in lines
              if line.startswith(("LM head (n + 1)", "head "))}
    assert list(scores) == ["LM head (n + 1)", "head 1 (n + 2)", "head 2 (n + 3)",
                            "head 3 (n + 4)"]
    for name, (n_rows, loss_before, loss_after, *accuracies) in scores.items():
        assert int(n_rows) > 0 and len(accuracies) == 4 and all(a.endswith("%") for a in accuracies)
        if name != "LM head (n + 1)":
            assert float(loss_after) < float(loss_before)
    assert sum(line.startswith("  epoch ") for line in lines) == 2
    heads = MedusaHeads.load(out)
    heads.check_fits(target)
    assert heads.n_heads == 3 and np.any(heads.W != 0)
    assert sorted(os.listdir(tmp_path)) == ["heads.npz"]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "empty.txt").write_text("  \n")
    (folder / "latin1.txt").write_bytes("caf\xe9 au lait, na\xefve".encode("latin-1"))
    (folder / "long_prompt.txt").write_text("the cat sat " * 30 + "\n")
    return folder


BAD_COMMANDS = {
    "an unknown size": (["--model", "7B"], "unknown model"),
    "a missing folder": (["--model", "{dir}/no/such/model"], "unknown model"),
    "too few tokens": (["--tokens", "10"], "--tokens must be at least"),
    "no heads": (["--heads", "0"], "--heads must be at least 1"),
    "more heads than a sequence has room for": (["--heads", "40", "--length", "30"],
                                                "too short for 40 heads"),
    "--out in a missing folder": (["--out", "{dir}/no/such/folder/h.npz"], "cannot write"),
    "--out a folder": (["--out", "{dir}"], "is a folder"),
    "a missing --text": (["--text", "{dir}/no_such.txt"], "cannot read"),
    "an empty --text": (["--text", "{dir}/empty.txt"], "is empty"),
    "a --text that is not UTF-8": (["--text", "{dir}/latin1.txt"], "is not UTF-8"),
    "--text and --prompts": (["--text", "{dir}/empty.txt", "--prompts", "{dir}/empty.txt"],
                             "do not go together"),
    "a prompt too long": (["--prompts", "{dir}/long_prompt.txt"], "after prompts of up to"),
    "a negative temperature": (["--temperature", "-1"], "temperature must be"),
    "no learning rate": (["--lr", "0"], "--lr must be"),
    "nothing held out": (["--held_out", "0"], "--held_out must be"),
    "no epochs": (["--epochs", "0"], "--epochs must be"),
    "a token count that is no number": (["--tokens", "many"], "invalid int value"),
    "an unknown flag": (["--bogus"], "unrecognized arguments"),
}


@pytest.mark.parametrize("case", list(BAD_COMMANDS))
def test_a_bad_command_line_is_one_error_line(case, bad_inputs, tmp_path, capsys):
    flags, expected = BAD_COMMANDS[case]
    flags = [f.replace("{dir}", str(bad_inputs)) for f in flags]
    if "--out" not in flags:
        flags += ["--out", str(tmp_path / "h.npz")]
    try:
        code = command.main(["train", "--model", str(TINY), "--tokens", "200", "--no_progress",
                            *flags])
    except SystemExit as e:  # argparse's own errors exit from inside parse_args
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "h.npz").exists()


@pytest.mark.parametrize("flags", [["--model", "7B"], ["--text", "{dir}/latin1.txt"]])
def test_a_bad_command_line_in_a_process_of_its_own(flags, bad_inputs, tmp_path):
    flags = [f.replace("{dir}", str(bad_inputs)) for f in flags]
    r = run_command("--model", str(TINY), "--out", str(tmp_path / "h.npz"), *flags)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr


# --- Each mistake is caught -------------------------------------------------------------------


def silu_grad_without_the_u_term(u):
    return medusa.sigmoid(u)  # s(u) alone: SiLU' without u s(u) (1 - s(u))


def head_backward_dW_transposed(dz, h, u):
    du = dz * medusa.silu_grad(u)
    return du.T @ h, np.sum(du, axis=0)


def head_backward_db_averaged(dz, h, u):
    du = dz * medusa.silu_grad(u)
    return h.T @ du, np.mean(du, axis=0)


def cross_entropy_backward_without_1_over_N(probs, y):
    dlogits = probs.copy()
    dlogits[np.arange(len(y)), y] -= 1.0
    return dlogits


def head_forward_without_the_residual(h, W, b):
    u = h @ W + b[..., None, :]
    return medusa.silu(u), u


def adam_step_without_bias_correction(self, grads):
    self.t += 1
    for theta, g, m, v in zip(self.params, grads, self.m, self.v):
        m[...] = self.b1 * m + (1 - self.b1) * g
        v[...] = self.b2 * v + (1 - self.b2) * g * g
        theta -= self.lr * m / (np.sqrt(v) + self.eps)


def rows_guessing_one_token_too_near(sequences, n_heads):
    h, targets = [], []
    for tokens, hidden, n_given in sequences:
        L = len(tokens)
        t = np.full((L - 1, n_heads + 1), -1, dtype=np.int64)
        for k in range(n_heads + 1):
            t[: L - 1 - k, k] = tokens[k : L - 1]  # the token at n + k, not n + k + 1
            t[: max(0, n_given - k - 1), k] = -1
        h.append(hidden)
        targets.append(t)
    return np.concatenate(h).astype(np.float32), np.concatenate(targets)


def save_in_place(self, path):
    with open(path, "wb") as f:  # straight onto the final name
        np.savez(f, W=self.W, b=self.b, target=np.str_(self.target),
                 **{k: np.int64(v) for k, v in self.shape.items()})


def no_shape_check(self, target):
    if target.hparams["n_embd"] != self.shape["n_embd"]:
        raise GPT2Error("another width")  # n_embd alone: another model of the same width passes


# name: (what to patch, replacement, the tests that must fail)
MISTAKES = {
    "SiLU' without the u (1 - s) term": (
        (medusa, "silu_grad", silu_grad_without_the_u_term),
        [test_silu_gradient, test_gradients_of_W_and_b,
         test_the_whole_loss_and_its_gradient_along_random_directions]),
    "dW transposed": ((medusa, "head_backward", head_backward_dW_transposed),
                      [test_gradients_of_W_and_b,
                       test_the_whole_loss_and_its_gradient_along_random_directions]),
    "db averaged, not summed": ((medusa, "head_backward", head_backward_db_averaged),
                                [test_gradients_of_W_and_b,
                                 test_the_whole_loss_and_its_gradient_along_random_directions]),
    "dlogits without 1/N": ((medusa, "cross_entropy_backward",
                             cross_entropy_backward_without_1_over_N),
                            [test_cross_entropy_gradient, test_gradient_through_the_tied_lm_head,
                             test_gradients_of_W_and_b]),
    "z without the residual h": ((medusa, "head_forward", head_forward_without_the_residual),
                                 [test_untrained_heads_score_like_the_lm_head]),
    "Adam without bias correction": ((medusa.Adam, "step", adam_step_without_bias_correction),
                                     [test_adam_matches_a_hand_computation]),
    "head k guessing the token at n + k": ((training, "rows", rows_guessing_one_token_too_near),
                                           [test_rows_by_hand]),
    "heads saved straight onto their name": ((MedusaHeads, "save", save_in_place),
                                             [test_save_leaves_nothing_half_written]),
    "a shape check of n_embd alone": ((MedusaHeads, "check_fits", no_shape_check),
                                      [test_heads_for_another_shape_are_one_error]),
}


def call(test, target, tmp_path, monkeypatch):
    """Run a test function, giving it the fixtures it names."""
    available = {"target": target, "tmp_path": tmp_path, "monkeypatch": monkeypatch}
    names = test.__code__.co_varnames[: test.__code__.co_argcount]
    test(**{name: available[name] for name in names})


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_each_mistake_is_caught(mistake, target, tmp_path, monkeypatch):
    (owner, name, replacement), tests = MISTAKES[mistake]
    here = sys.modules[__name__]
    for test in tests:
        folder = tmp_path / test.__name__
        folder.mkdir()
        with monkeypatch.context() as mp:
            mp.setattr(owner, name, replacement)
            if owner in (medusa, training) and getattr(here, name, None) is not None:
                mp.setattr(here, name, replacement)  # this file's imported copy too
            with pytest.raises(AssertionError):
                call(test, target, folder, mp)
