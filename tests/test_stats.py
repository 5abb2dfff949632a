"""Stats: the record of a run, and the rates the report divides out of it (gpt2_numpy/stats.py)."""
import math

from gpt2_numpy.stats import Stats


def a_run(**fields):
    """A speculative run with a prefill that is slow beside its decoding, as on a long prompt."""
    stats = Stats("speculative", n_prompt=12, prefill_seconds=3.0, decode_seconds=2.0, **fields)
    for K, accepted in [(4, 4), (4, 1), (2, 0)]:  # the last round capped at the tokens left
        stats.add_round(K, accepted)
    stats.n_generated = 5 + 2 + 1
    return stats


def test_seconds_are_the_prefill_and_the_decoding():
    assert a_run().seconds == 3.0 + 2.0


def test_tokens_per_second_count_decoding_only():
    stats = a_run()
    assert stats.tokens_per_second == 8 / 2.0  # not 8 / 5.0: the prompt is not generated
    assert math.isnan(Stats("autoregressive").tokens_per_second)  # nothing timed: no rate


def test_the_rates_of_a_speculative_run():
    stats = a_run()
    assert (stats.rounds, stats.drafted, stats.accepted) == (3, 10, 5)
    assert stats.acceptance_rate == 5 / 10  # per drafted token, not per round (5 / 3)
    assert stats.tokens_per_round == 8 / 3
    assert stats.accepted_histogram() == [1, 1, 0, 0, 1]  # 0..4 accepted: one round each of 0, 1, 4
    d = stats.as_dict()
    assert d["seconds"] == 5.0 and d["tokens_per_second"] == 4.0 and d["acceptance_rate"] == 0.5
    assert d["K_per_round"] == [4, 4, 2] and d["accepted_per_round"] == [4, 1, 0]


def test_a_run_that_drafted_nothing_has_no_acceptance_rate():
    stats = Stats("speculative", n_generated=3, decode_seconds=1.0)
    for _ in range(3):
        stats.add_round(0, 0)
    assert math.isnan(stats.acceptance_rate) and stats.tokens_per_round == 1.0
