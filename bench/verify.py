"""What a verify step costs: r(T), a forward over T new tokens against one over 1, and the knobs
of model.py (padding few-row products, the c_proj layout) that move it."""
import numpy as np
from gpt2_numpy.backend import synchronize
from gpt2_numpy.products import DEFAULT_PLAN, Products, planned, products_of

from .models import RANDOM, prompt_ids
from .timing import best, quiet_sample


def forward_costs(model, n_past, Ts, reps, extra=((2, 1),)):
    """Seconds of one forward over T new tokens after n_past cached ones, for each T (logits for
    all T rows, as a verify step needs) and for each (T, n_logits) in `extra`."""
    ids = prompt_ids(model, n_past + max(Ts), seed=1)
    cache = model.new_cache(n_past + max(Ts))
    model(ids[:n_past], cache, n_logits=0)
    calls = [(T, T) for T in Ts] + list(extra)
    samples = {c: [] for c in calls}
    for _ in range(reps):
        # One call per sample, the calls interleaved: a slow spell hits every T alike, and each
        # call follows a different one, as in decoding (back-to-back repeats of the same call
        # run ~5% faster than they do in a real decode).
        for T, n_logits in calls:
            def step():
                cache.rollback(n_past)
                model(ids[n_past : n_past + T], cache, n_logits=n_logits)
                synchronize(cache.k)  # a GPU returns before it has finished; a no-op on NumPy
            samples[T, n_logits].append(quiet_sample(step))
    return {c: best(s) for c, s in samples.items()}


def r_of_T(model, label, n_past, Ts, reps):
    costs = forward_costs(model, n_past, Ts, reps)
    t1 = costs[1, 1]["best"]
    rows = [{"model": model.name, "weights": label, "T": T, "n_past": n_past,
             "ms": 1e3 * costs[T, T]["best"], "ms_median": 1e3 * costs[T, T]["median"],
             "r": costs[T, T]["best"] / t1, "max_foreign": costs[T, T]["max_foreign"]} for T in Ts]
    return rows, t1, costs[2, 1]["best"]


def column_major_c_proj(params, parts=("attn", "mlp")):
    """The tree with the c_proj matrices of `parts` in every block copied column by column (F
    order), the other layout a CPU could stream them in. Same names, shapes and values."""
    def proj(part):
        return {**part, "c_proj": {**part["c_proj"], "w": np.asfortranarray(part["c_proj"]["w"])}}
    blocks = [{**b, **{part: proj(b[part]) for part in parts}} for b in params["blocks"]]
    return {**params, "blocks": blocks}


KNOBS = {  # name: (the products' plan, transform of the parameter tree)
    "checkpoint layout, 2..7 rows padded to 8": (DEFAULT_PLAN, None),
    "no padding": ({}, None),
    "c_proj copied column-major, padded": (DEFAULT_PLAN, column_major_c_proj),
    "attn.c_proj only copied column-major, padded": (DEFAULT_PLAN,
                                                     lambda p: column_major_c_proj(p, ["attn"])),
    "mlp.c_proj only copied column-major, padded": (DEFAULT_PLAN,
                                                    lambda p: column_major_c_proj(p, ["mlp"])),
}


def knobs(sizes_params, n_past, reps, Ts=(1, 2, 5, 8)):
    """Forward costs with model.py's padding of few-row products off and on, and with the c_proj
    matrices in the other layout, all configurations interleaved within every repetition."""
    import gpt2_numpy as gpt2

    rows = []
    for size, (h, params) in sizes_params.items():
        models = {name: gpt2.GPT2(h, planned(fn(params) if fn else params, Products(plan)),
                                  name=size)
                  for name, (plan, fn) in KNOBS.items()}
        ids = prompt_ids(next(iter(models.values())), n_past + max(Ts), seed=1)
        caches = {}
        for name, model in models.items():
            caches[name] = model.new_cache(n_past + max(Ts))
            model(ids[:n_past], caches[name], n_logits=0)
        samples = {}
        for _ in range(reps):
            for name, model in models.items():
                for T in Ts:
                    def step():
                        caches[name].rollback(n_past)
                        model(ids[n_past : n_past + T], caches[name], n_logits=T)
                    samples.setdefault((name, T), []).append(quiet_sample(step))
        for name in models:
            ms = {T: 1e3 * best(samples[name, T])["best"] for T in Ts}
            rows.append({"model": size, "weights": RANDOM, "configuration": name,
                         **{f"ms_T{T}": ms[T] for T in Ts}, **{f"r{T}": ms[T] / ms[1] for T in Ts[1:]},
                         "max_foreign": max(best(samples[name, T])["max_foreign"] for T in Ts)})
        del models, caches
    return rows


def r_by_strategy(model, label, n_past, Ts, reps):
    """r(T) three ways on the same weights, interleaved: every T as one product over the rows
    padded to 8 (2..7 rows; the default plan), as the model's measured plan says, and as T
    one-row products. r is each forward's time over the fastest T = 1 forward (one row is one
    product in all three)."""
    import gpt2_numpy as gpt2

    plan = products_of(model) or Products()  # a model without a plan multiplies as the default
    strategies = {"padded": Products(DEFAULT_PLAN), "plan": plan,
                  "rows": Products({T: "rows" for T in Ts})}
    models = {name: gpt2.GPT2(model.hparams, planned(model.params, p), name=model.name)
              for name, p in strategies.items()}
    ids = prompt_ids(model, n_past + max(Ts), seed=1)
    caches = {}
    for name, m in models.items():
        caches[name] = m.new_cache(n_past + max(Ts))
        m(ids[:n_past], caches[name], n_logits=0)
    samples = {}
    for _ in range(reps):
        for T in Ts:
            for name, m in models.items():
                def step(m=m, cache=caches[name]):
                    cache.rollback(n_past)
                    m(ids[n_past : n_past + T], cache, n_logits=T)
                samples.setdefault((name, T), []).append(quiet_sample(step))
    t1 = min(best(samples[name, 1])["best"] for name in models)
    rows = []
    for T in Ts:
        row = {"model": model.name, "weights": label, "T": T, "n_past": n_past,
               "plan": plan.plan.get(T, "one")}
        for name in models:
            row[f"ms_{name}"] = 1e3 * best(samples[name, T])["best"]
            row[f"r_{name}"] = best(samples[name, T])["best"] / t1
        row["max_foreign"] = max(best(samples[name, T])["max_foreign"] for name in models)
        rows.append(row)
    return rows
