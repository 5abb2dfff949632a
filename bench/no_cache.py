"""Without a KV cache: what re-running the whole sequence for every new token costs."""
from .models import prompt_ids
from .report import print_row
from .timing import best, quiet_sample


def no_cache(model, label, positions, reps):
    """ms per generated token at position p: re-running all p tokens (no cache; logits for every
    row, as picoGPT computes them, and for the last row only) vs one cached step."""
    ids = prompt_ids(model, max(positions), seed=2)
    rows = []
    for p in positions:
        cache = model.new_cache(p)
        model(ids[: p - 1], cache, n_logits=0)

        def cached():
            cache.rollback(p - 1)
            model(ids[p - 1 : p], cache)

        full = best([quiet_sample(lambda: model(ids[:p], model.new_cache(p), n_logits=None))
                      for _ in range(reps)])
        last = best([quiet_sample(lambda: model(ids[:p], model.new_cache(p), n_logits=1))
                     for _ in range(reps)])
        step = best([quiet_sample(cached) for _ in range(max(3, reps))])
        rows.append({"model": model.name, "weights": label, "position": p,
                     "no_cache_all_logits_ms": 1e3 * full["best"],
                     "no_cache_last_logits_ms": 1e3 * last["best"], "kv_cache_ms": 1e3 * step["best"],
                     "ratio": full["best"] / step["best"],
                     "max_foreign": max(full["max_foreign"], last["max_foreign"], step["max_foreign"])})
        print_row("no cache", rows[-1])
    return rows
