"""Speculative against autoregressive decoding, end to end, next to the speedups predicted from
the measured acceptance a, cost ratio c and verify cost r(T)."""
import numpy as np
from gpt2_numpy.adaptive import expected_tokens

from .report import print_row
from .timing import quiet_run


def predicted_steady(a, K, c, c2, r):
    """Speedup in the steady state for i.i.d. acceptance a: E[tokens/round] over the round's cost
    in target steps, K c + r(K+1), plus (c2 - c) in the fraction a^K of rounds that follow a
    fully accepted one (the draft then feeds 2 tokens)."""
    return expected_tokens(K, a) / (K * c + r[K + 1] + a ** K * (c2 - c))


def predicted_per_round(stats, c, c2, r):
    """Target-step units for the rounds exactly as they ran: K_r c + r(K_r + 1), plus (c2 - c)
    when the previous round accepted every draft (the draft then feeds 2 tokens: its last draft
    and the bonus). Returns tokens per target-step-equivalent, i.e. the predicted speedup."""
    cost, prev_full = 0.0, False
    for K_r, m in zip(stats.K_per_round, stats.accepted_per_round):
        cost += K_r * c + r[K_r + 1] + ((c2 - c) if prev_full and K_r else 0.0)
        prev_full = K_r > 0 and m == K_r
    return stats.n_generated / cost


def speculative(pair, target, draft, label, prompt, n_tokens, Ks, c, c2, r, reps):
    """Greedy speculative decoding for each K (the fastest of `reps` runs), with predictions.
    The autoregressive baseline is re-measured next to each K (same tokens, same repetitions),
    so that the machine's speed drifting over minutes does not leak into the speedup."""
    import gpt2_numpy as gpt2

    rows = []
    for K in Ks:
        runs, ar_runs = [], []
        for _ in range(reps):
            ar_runs.append(quiet_run(lambda: gpt2.autoregressive_sample(
                target, prompt, n_tokens, gpt2.Warp(0.0), np.random.default_rng(0))[1]))
            runs.append(quiet_run(lambda: gpt2.speculative_sample(
                target, draft, prompt, n_tokens, K, gpt2.Warp(0.0), np.random.default_rng(0))[1]))
        stats, foreign = min(runs, key=lambda run: run[0].decode_seconds)
        ar_ms = 1e3 * min(s.decode_seconds / s.n_generated for s, _ in ar_runs)
        a = stats.acceptance_rate
        ms = 1e3 * stats.decode_seconds / stats.n_generated
        formula = expected_tokens(K, a) / (K * c + r[K + 1])
        steady = predicted_steady(a, K, c, c2, r)
        per_round = predicted_per_round(stats, c, c2, r)
        measured = ar_ms / ms
        rows.append({"pair": pair, "weights": label, "K": K, "new_tokens": stats.n_generated,
                     "tokens_per_s": 1e3 / ms, "ms_per_token": ms, "ar_ms_per_token": ar_ms, "acceptance": a,
                     "tokens_per_round": stats.tokens_per_round, "rounds": stats.rounds,
                     "draft_s": stats.draft_seconds, "target_s": stats.target_seconds,
                     "speedup": measured, "predicted_formula": formula,
                     "predicted_with_catch_up": steady, "predicted_per_round": per_round,
                     "error_formula": measured / formula - 1, "error_with_catch_up": measured / steady - 1,
                     "error_per_round": measured / per_round - 1,
                     "c": c, "r_K1": r[K + 1], "reps": reps, "foreign": foreign})
        print_row("speculative", rows[-1])
    return rows
