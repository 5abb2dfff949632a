"""Compare autoregressive and speculative decoding of GPT-2, side by side.

    python main.py --K 4 --temperature 0

The draft (124M by default) proposes K tokens per round; the target (355M) checks them all in one
forward. Both runs sample from the same target distribution with the same seed, so with
--temperature 0 they print the same text; whether speculative decoding is faster depends on the
hardware and on how often the target accepts the draft (docs/performance.md). --mode all adds a
third run, the draft alone, and says where speculative decoding lands between the two speeds.

This file is the comparison, top to bottom. The flags, their checks and the report's wording
live in gpt2_numpy/cli.py; flags, errors and output are described in docs/cli.md.
"""
import sys

import gpt2_numpy

gpt2_numpy.tune_process()  # first, before NumPy loads OpenBLAS: its kernels, malloc (tuning.py)

import numpy as np  # noqa: E402
from gpt2_numpy import cli  # noqa: E402


def backend(name: str):
    """The library the models run on: gpt2_numpy on the CPU, or its GPU twin gpt2_cupy (which
    gpt2_numpy never imports: the choice is made here, at the top)."""
    if name == "cupy":
        import gpt2_cupy

        return gpt2_cupy
    return gpt2_numpy


def decode(mode, gpt2, target, draft, prompt, args, settings):
    """One run: (new token ids, Stats). Every run starts from the same seed, so each draws the
    same random numbers: at temperature 0 the target alone and speculative decoding print the
    same tokens, and at any temperature both sample the target's distribution."""
    rng = np.random.default_rng(args.seed)
    n, warp = args.n_tokens_to_generate, settings.warp
    with cli.streaming(mode, args, target.tokenizer, prompt) as on_tokens:
        if mode == "autoregressive":  # the target alone: one forward per token
            return gpt2.autoregressive_sample(target, prompt, n, warp, rng, on_tokens)
        if mode == "draft_alone":  # --mode all: the draft alone, the speed ceiling
            return gpt2.autoregressive_sample(draft, prompt, n, warp, rng, on_tokens)
        if settings.widths:  # --tree: a token tree in place of the chain
            return gpt2.tree_speculative_sample(target, draft, prompt, n, settings.widths, warp,
                                                rng, on_tokens)
        if settings.policy is not None:  # --adaptive: each round's K chosen before it
            return gpt2.adaptive_speculative_sample(target, draft, prompt, n, settings.policy,
                                                    warp, rng, on_tokens)
        # K drafts per round, all checked by one target forward
        return gpt2.speculative_sample(target, draft, prompt, n, settings.K, warp, rng,
                                       on_tokens)


def compare(args) -> dict:
    """Check the flags, load the models, decode in every mode asked for; the report."""
    settings = cli.check(args)  # everything that needs no model, before anything is loaded
    gpt2 = backend(args.backend)
    target, draft, load_seconds = cli.load_models(args, settings, gpt2)
    prompt = cli.encode_prompt(args, settings, target, draft)  # fits each model's context
    # Untimed: page every weight in (or, on a GPU, compile the kernels and record the CUDA graphs
    # the timed runs replay, for caches of the capacity the decoders ask for: gpt2_cupy/graphs.py).
    for model in {id(m): m for m in (target, draft) if hasattr(m, "warm_up")}.values():
        model.warm_up(len(prompt) + args.n_tokens_to_generate - 1)
    runs = {mode: decode(mode, gpt2, target, draft, prompt, args, settings)
            for mode in settings.modes}
    # Text, time, acceptance, the speedup and whether the tokens are the same (cli.py words it).
    return cli.make_report(args, settings, target.tokenizer, prompt, load_seconds, runs)


def main(argv=None) -> int:
    args = cli.parse_args(argv, description=__doc__.split("\n\n")[0])
    return cli.run(compare, args)  # the report on stdout, or one `error:` line and status 2


if __name__ == "__main__":
    sys.exit(main())
