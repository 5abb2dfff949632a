"""products.py: every way of computing a few-row product gives x @ w, the plan is what the
timings say, and a model computes the same logits whichever plan it has."""
import itertools

import numpy as np
import pytest

import gpt2_numpy as gpt2
from conftest import FIXTURES, tiny_model
from gpt2_numpy import products as products_module
from gpt2_numpy.products import (DEFAULT_PLAN, OPTIONS, PlannedMatrix, Products, attach, choose,
                                 describe, multiply, options_for, planned, plans_path,
                                 products_of, weight_matrices)


@pytest.mark.parametrize("T, option", list(itertools.product(range(1, 18), OPTIONS)))
def test_each_option_gives_x_at_w(T, option):
    rng = np.random.default_rng(T)
    x = rng.standard_normal((T, 24), dtype=np.float32)
    w = rng.standard_normal((24, 40), dtype=np.float32)
    got = multiply(x, w, option)
    assert got.shape == (T, 40) and got.dtype == np.float32
    np.testing.assert_allclose(got, x @ w, rtol=1e-5, atol=1e-5)  # float32 rounding only


def test_options_apply_to_a_transposed_view_too():
    """The LM head multiplies by wte.T, a column-major view."""
    rng = np.random.default_rng(0)
    x, wte = rng.standard_normal((3, 24), dtype=np.float32), rng.standard_normal((50, 24), dtype=np.float32)
    for option in OPTIONS:
        np.testing.assert_allclose(multiply(x, wte.T, option), x @ wte.T, rtol=1e-5, atol=1e-5)


def test_products_follow_their_plan(monkeypatch):
    import gpt2_numpy.products as products_module

    calls = []
    x, w = np.ones((3, 4), np.float32), np.ones((4, 5), np.float32)
    monkeypatch.setattr(products_module, "multiply",
                        lambda x, w, option: calls.append(option) or x @ w)
    Products({3: "rows"})(x, w)
    Products({3: "pad8"})(x, w)
    Products({})(x, w)  # a T the plan does not mention: one product
    Products()(x[None], w[None])  # batched (attention's): straight through, never planned
    assert calls == ["rows", "pad8", "one"]


def test_the_choice_is_the_fastest_option():
    timings = {(1, "one"): 1.0,
               (2, "one"): 2.5, (2, "pad8"): 2.4, (2, "rows"): 1.5,   # rows win clearly
               (5, "one"): 2.5, (5, "pad8"): 1.9, (5, "rows"): 3.5,   # padding wins
               (9, "one"): 3.0, (9, "pad16"): 2.6, (9, "rows"): 9.0}  # padding to 16 wins
    assert choose(timings) == {1: "one", 2: "rows", 5: "pad8", 9: "pad16"}
    timings[2, "rows"] = 3.0  # now padding to 8 wins at 2 rows
    assert choose(timings)[2] == "pad8"


def test_a_near_tie_keeps_the_default():
    """Within the margin of the default option's time, the default stays (noise is no reason)."""
    assert DEFAULT_PLAN[2] == "pad8" and DEFAULT_PLAN[9] == "one"
    timings = {(2, "pad8"): 2.0, (2, "rows"): 1.95, (9, "one"): 3.0, (9, "pad16"): 2.9}
    assert choose(timings, margin=0.05) == {2: "pad8", 9: "one"}
    assert choose(timings, margin=0.0) == {2: "rows", 9: "pad16"}


class FakeClock:
    """A clock that advances, per timed block, by a cost the test sets for (T, option) and the
    how-many-th time that block is timed: it sees which block runs through `multiply`, which
    `measure` calls once per matrix."""

    def __init__(self, costs, monkeypatch):
        self.now, self.costs, self.timed = 0.0, costs, []
        real = products_module.multiply

        def multiply(x, w, option):
            T = x.shape[0]
            self.now += self.costs(T, option, self.timed.count((T, option)))
            self.timed.append((T, option))
            return real(x, w, option)

        monkeypatch.setattr(products_module, "multiply", multiply)

    def __call__(self):
        return self.now


def test_measure_plans_what_the_fake_timings_say(monkeypatch):
    def costs(T, option, n):  # rows cost T, padding costs 2.5 whatever T, "one" 3 (1 for T = 1)
        return {"rows": T, "one": 1.0 if T == 1 else 3.0}.get(option, 2.5)

    clock = FakeClock(costs, monkeypatch)
    matrices = [np.ones((4, 6), np.float32), np.ones((6, 4), np.float32)]
    products = Products()
    plan = products.measure(matrices, Ts=range(1, 11), reps=2, clock=clock)
    # 3 rows: padding to 4 ties with the default (padding to 8), so the default stays
    assert plan == {1: "one", 2: "rows", 3: "pad8", 4: "pad8", 5: "pad8", 6: "pad8", 7: "pad8",
                    8: "one", 9: "pad16", 10: "pad16"}
    assert products.plan == plan and products.timings[2, "rows"] == 2 * len(matrices)
    # rows stop being timed once they lost by more than half: at 4 rows (cost 4 vs 2.5)
    assert max(T for T, option in clock.timed if option == "rows") == 4
    assert "rows" in describe(plan) and repr(products).startswith("Products(plan={1: one, 2: rows")


def test_measure_keeps_each_ways_fastest_time_so_one_hiccup_changes_nothing(monkeypatch):
    """Two rows: one-row products cost 1.5, padding 2.4; the first time the rows are timed, the
    machine hiccups (10). The best of the repetitions is what the way costs."""
    def costs(T, option, n):
        if option == "rows":
            return 10.0 if n < 2 else 1.5  # n counts matrices: the first repetition's two
        return {"one": 1.0 if T == 1 else 3.0}.get(option, 2.4)

    plan = Products().measure([np.ones((4, 6), np.float32)] * 2, Ts=range(1, 3), reps=3,
                              clock=FakeClock(costs, monkeypatch))
    assert plan == {1: "one", 2: "rows"}


def test_a_choice_that_is_not_faster_again_goes_back_to_the_default(monkeypatch):
    """A hiccup on every repetition of the default (padding to 8 at two rows) while `measure`
    times it makes the rows look faster; timed again against it, they are not: the default."""
    timed_before = []

    def costs(T, option, n):
        timed_before.append(option)
        if option == "pad8":
            return 9.0 if n < 6 else 2.0  # three repetitions of two matrices with a hiccup
        return {"one": 1.0 if T == 1 else 3.0, "rows": 2.5}.get(option, 4.0)

    products = Products()
    plan = products.measure([np.ones((4, 6), np.float32)] * 2, Ts=range(1, 3), reps=3,
                            clock=FakeClock(costs, monkeypatch))
    assert choose(products.timings)[2] == "rows"  # what the first timings alone would plan
    assert plan == {1: "one", 2: "pad8"}


def test_every_planned_T_has_its_options_timed():
    for T in range(2, 17):
        options = options_for(T)
        assert options[0] == "one" and "rows" in options
        assert all(o in ("one", "rows", "blocks") or int(o[3:]) > T for o in options)
        assert ("blocks" in options) == (T <= 4)  # beyond 4 rows the reads it saves cost more


def test_blocks_follow_the_layout_and_cover_every_row(monkeypatch):
    """Blocks smaller than the matrix, both layouts: every row and column still counts once."""
    import gpt2_numpy.products as products

    monkeypatch.setattr(products, "BLOCK_BYTES", 7 * 4 * 13)  # 7 rows of 13 floats: a ragged end
    rng = np.random.default_rng(5)
    x, w = rng.standard_normal((3, 20)), rng.standard_normal((20, 13))
    np.testing.assert_allclose(multiply(x, w, "blocks"), x @ w, rtol=1e-12)
    wt = rng.standard_normal((13, 20)).T  # [20, 13] column-major, as wte.T is
    np.testing.assert_allclose(multiply(x, wt, "blocks"), x @ wt, rtol=1e-12)


def test_measure_leaves_other_backends_alone():
    products = Products({2: "rows"})
    assert products.measure([[[1.0]]]) == {2: "rows"}  # not NumPy arrays: nothing timed
    assert products.timings == {}


def test_weight_matrices_in_forward_order_with_a_share_of_the_head():
    model = tiny_model(n_layer=4, n_vocab=40)
    ws = weight_matrices(model.params, n_layers=2)
    blocks = model.params["blocks"]
    assert ws[0] is blocks[0]["attn"]["c_attn"]["w"] and ws[7] is blocks[1]["mlp"]["c_proj"]["w"]
    assert len(ws) == 9 and ws[8].shape == (24, 20)  # half the blocks: half of wte's rows
    np.testing.assert_array_equal(ws[8], model.params["wte"][:20].T)
    assert len(weight_matrices(model.params, n_layers=None)) == 17


@pytest.mark.parametrize("plan", [{T: option for T in range(1, 17)} for option in OPTIONS[1:]],
                         ids=OPTIONS[1:])
def test_a_model_gives_the_same_logits_whatever_its_plan(target, plan):
    ids = np.random.default_rng(5).integers(0, target.n_vocab, 20).tolist()
    planned_model = gpt2.GPT2(target.hparams, planned(target.params, Products(plan)))
    for chunk in ([slice(0, 9)], [slice(0, 3), slice(3, 5), slice(5, 12), slice(12, 20)]):
        caches = target.new_cache(20), planned_model.new_cache(20)
        for s in chunk:
            want = target(ids[s], caches[0], n_logits=None)
            got = planned_model(ids[s], caches[1], n_logits=None)
            assert type(got) is np.ndarray  # what comes out of a planned product is plain
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        # float32 rounding of differently ordered sums: relative to the keys' size
        np.testing.assert_allclose(caches[1].k, caches[0].k, atol=1e-5, rtol=1e-4)


def test_every_weight_product_of_a_forward_goes_through_the_plan(target):
    shapes = []

    class Spy(Products):
        def __call__(self, x, w):
            assert type(w) is np.ndarray  # the plan gets the plain matrix
            shapes.append(w.shape)
            return super().__call__(x, w)

    model = gpt2.GPT2(target.hparams, planned(target.params, Spy()))
    model([1, 2, 3], model.new_cache(3))
    d, V, n_layer = target.hparams["n_embd"], target.n_vocab, target.hparams["n_layer"]
    assert shapes == [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)] * n_layer + [(d, V)]
    assert type(target.params["wte"]) is np.ndarray  # the original tree is left as it was


def test_a_planned_matrix_is_a_plain_array_for_everything_but_its_products():
    w = np.arange(12, dtype=np.float32).reshape(3, 4).view(PlannedMatrix)
    w.products = Products()
    for out in (w + 1, w * w, np.take(w, [0, 2], axis=0), np.exp(w), w.T + 0):
        assert type(out) is np.ndarray
    assert type(w.T) is PlannedMatrix and w.T.products is w.products  # the LM head's view
    np.testing.assert_array_equal(np.ones((2, 3), np.float32) @ w, np.ones((2, 3)) @ np.asarray(w))
    from gpt2_numpy.backend import namespace_of

    assert namespace_of(w) is np


def test_attach_measures_once_per_machine_and_shape_then_reads_the_plan(monkeypatch, tmp_path):
    monkeypatch.setenv("GPT2_NUMPY_CACHE", str(tmp_path))
    measured = []
    real = Products.measure

    def measure(self, matrices, **kwargs):
        measured.append(len(matrices))
        return real(self, matrices, Ts=range(1, 4), reps=1)

    monkeypatch.setattr(Products, "measure", measure)
    first, again, other = tiny_model(), tiny_model(seed=3), tiny_model(n_embd=32, n_head=4)
    products = attach(first)
    assert measured == [9] and plans_path() == tmp_path / "products.json" and plans_path().exists()
    assert products_of(first) is products and type(first.params["wte"]) is PlannedMatrix
    assert attach(again).plan == products.plan and measured == [9]  # the same shapes: read back
    attach(other)
    assert measured == [9, 9]  # other shapes: measured
    plans_path().write_text("{not json")
    attach(tiny_model())
    assert measured == [9, 9, 9]  # an unreadable file is measured over, never a crash
    assert products_of(tiny_model()) is None


def test_a_plan_that_cannot_be_kept_is_only_measured_again(monkeypatch, tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("GPT2_NUMPY_CACHE", str(blocked / "below-a-file"))
    monkeypatch.setattr(Products, "measure", lambda self, m, **k: self.plan)
    assert attach(tiny_model()) is not None


def test_load_model_attaches_a_measured_plan():
    model = gpt2.load_model(str(FIXTURES / "tiny-3h"), progress=False)
    assert products_of(model) is not None and set(products_of(model).plan) == set(range(1, 17))
    assert set(products_of(model).plan.values()) <= set(OPTIONS)
