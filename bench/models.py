"""The models the benchmarks time, the prompts they feed them, and what their weights weigh.

Official weights where <models_dir>/<size>/ holds them (nothing is downloaded); otherwise random
weights in the official shapes. Speed does not depend on the values, so every timing is real,
but acceptance rates of random models are meaningless, and every row says which it had.
"""
import time

import numpy as np

RANDOM = "random weights: speed is real, acceptance is not"


OFFICIAL = "official weights"


TARGET_SIZE, DRAFT_SIZE = "355M", "124M"


PROMPT_TEXT = ("Alan Turing theorized that computers would one day become the most powerful "
               "machines on the planet. He imagined a machine that could")


def official_dir(size, models_dir):
    """The folder holding official weights for `size`, or None (never downloads)."""
    from gpt2_numpy.download import resolve_model_dir
    from gpt2_numpy.errors import GPT2Error

    try:
        return resolve_model_dir(size, models_dir, download=False)
    except GPT2Error:
        return None


def get_model(size, models_dir, seed, force_random=False):
    """(model, label, seconds): official weights if present, else random ones in the same shapes."""
    import gpt2_numpy as gpt2
    from gpt2_numpy.products import attach

    folder = None if force_random else official_dir(size, models_dir)
    start = time.perf_counter()
    if folder is not None:
        model = gpt2.load_model(str(folder), download=False, progress=False)
        model.name, label = size, OFFICIAL
    else:
        h = gpt2.official_hparams(size)
        model = gpt2.GPT2(h, gpt2.random_params(h, seed=seed), name=f"{size} (random, seed {seed})")
        attach(model)  # the products' plan, as load_model attaches it to official weights
        label = RANDOM
    return model, label, time.perf_counter() - start


def arrays(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from arrays(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from arrays(v)
    else:
        yield tree


def weight_bytes(model, streamed=False) -> int:
    """Bytes of all weights; streamed=True: those a decoding step reads (wpe: one row only)."""
    total = sum(a.nbytes for a in arrays(model.params))
    if streamed:
        wpe = model.params["wpe"]
        total -= wpe.nbytes - wpe.nbytes // wpe.shape[0]
    return total


def prompt_ids(model, length, seed=0):
    """`length` prompt tokens: the tokenized English prompt (repeated) when there is a tokenizer,
    otherwise fixed random ids (a random model has no tokenizer and no preference anyway)."""
    if model.tokenizer is not None:
        ids = model.tokenizer.encode(PROMPT_TEXT)
        return (ids * (length // len(ids) + 1))[:length]
    return np.random.default_rng(seed).integers(0, model.n_vocab, length).tolist()
