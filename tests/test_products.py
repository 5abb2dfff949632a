"""products.py: every way of computing a few-row product gives x @ w, the plan is what the
timings say, and a model computes the same logits whichever plan it has."""
import itertools

import numpy as np
import pytest

import gpt2_numpy as gpt2
from conftest import tiny_model
from gpt2_numpy.products import (DEFAULT_PLAN, OPTIONS, Products, choose, describe, multiply,
                                 options_for, weight_matrices)


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
    """A clock that advances, per timed block, by a cost the test sets for (T, option): it sees
    which block runs through `multiply`, which `measure` calls once per matrix."""

    def __init__(self, costs, monkeypatch):
        import gpt2_numpy.products as products_module

        self.now, self.costs, self.timed = 0.0, costs, []
        real = products_module.multiply

        def multiply(x, w, option):
            self.now += self.costs(x.shape[0], option)
            self.timed.append((x.shape[0], option))
            return real(x, w, option)

        monkeypatch.setattr(products_module, "multiply", multiply)

    def __call__(self):
        return self.now


def test_measure_plans_what_the_fake_timings_say(monkeypatch):
    def costs(T, option):  # rows cost T, padding costs 2.5 whatever T, "one" 3 (1 for T = 1)
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
    plain = gpt2.GPT2(target.hparams, target.params, products=Products({}))
    planned = gpt2.GPT2(target.hparams, target.params, products=Products(plan))
    for chunk in ([slice(0, 9)], [slice(0, 3), slice(3, 5), slice(5, 12), slice(12, 20)]):
        caches = plain.new_cache(20), planned.new_cache(20)
        for s in chunk:
            want = plain(ids[s], caches[0], n_logits=None)
            got = planned(ids[s], caches[1], n_logits=None)
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        np.testing.assert_allclose(caches[1].k, caches[0].k, atol=1e-5, rtol=0)


def test_a_model_with_products_equals_the_bare_forward(target):
    """GPT2 with a Products object gives the logits forward gives with the plain x @ w."""
    from gpt2_numpy.model import forward

    ids = np.random.default_rng(6).integers(0, target.n_vocab, 7).tolist()
    model = gpt2.GPT2(target.hparams, target.params, products=Products({7: "rows"}))
    want = forward(target.params, ids, target.new_cache(7), target.hparams["n_head"], None)
    np.testing.assert_allclose(model(ids, model.new_cache(7), n_logits=None), want, atol=1e-4,
                               rtol=0)


def test_every_weight_product_of_a_forward_goes_through_the_models_products(target):
    shapes = []

    class Spy(Products):
        def __call__(self, x, w):
            shapes.append(w.shape)
            return super().__call__(x, w)

    model = gpt2.GPT2(target.hparams, target.params, products=Spy())
    model([1, 2, 3], model.new_cache(3))
    d, V, n_layer = target.hparams["n_embd"], target.n_vocab, target.hparams["n_layer"]
    assert shapes == [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)] * n_layer + [(d, V)]


def test_warm_up_measures_a_plan_for_every_planned_T():
    model = tiny_model()
    model.warm_up()
    assert set(model.products.plan) == set(range(1, 17))
    assert set(model.products.plan.values()) <= set(OPTIONS)
