"""What the decoders check: a request that fits the context, K, a draft that fits the target, a
draft drawn from its q. Each failure is a GPT2Error that says what to change."""
import numbers

from .errors import GPT2Error
from .stats import Stats


def check_n_new(n_new: int) -> None:
    if n_new < 1:
        raise GPT2Error(f"the number of tokens to generate must be >= 1, got {n_new}")


def check_K(K) -> None:
    if not isinstance(K, numbers.Integral):
        raise GPT2Error(f"K (draft tokens per round) must be an int, got {K!r} (a policy that "
                        f"chooses K goes to adaptive.adaptive_speculative_sample)")
    if K < 1:
        raise GPT2Error(f"K (draft tokens per round) must be >= 1, got {K}")


def check_vocabularies(drafter, target) -> None:
    if drafter.n_vocab != target.n_vocab:
        raise GPT2Error(f"draft and target vocabularies differ ({drafter.n_vocab} vs "
                        f"{target.n_vocab} tokens): speculative decoding needs the same tokenizer")


def check_draft_context(draft, capacity: int) -> None:
    """A draft model must hold as many positions as the target's cache will: its context too."""
    if capacity > draft.n_ctx:
        raise GPT2Error(f"the draft model's context is {draft.n_ctx} tokens, but this run needs "
                        f"{capacity} positions in its cache (the prompt and the tokens to "
                        f"generate): ask for fewer tokens, or use a draft with a longer context")


def not_drawn_from_q(token: int, where: str) -> GPT2Error:
    """The error for a proposed token that its q gives no mass: the drafter did not draw it from
    the q it returned, and the ratio p/q would be 0/0."""
    return GPT2Error(f"the drafter proposed token {token} {where} but its q gives it probability "
                     f"0: a drafter must propose tokens drawn from the q it returns")


def checked_request(model, prompt, n_new: int, mode: str):
    """Validate a request; cap it at the context. Returns (tokens, n_new, stats)."""
    check_n_new(n_new)
    tokens = [int(t) for t in prompt]
    if len(tokens) < 1:
        raise GPT2Error("the prompt must contain at least one token")
    if len(tokens) >= model.n_ctx:
        raise GPT2Error(f"the prompt has {len(tokens)} tokens but the model's context is "
                        f"{model.n_ctx}: no room left to generate")
    room = model.n_ctx - len(tokens)  # generation stops when the context is full
    stats = Stats(mode, n_prompt=len(tokens), stopped_at_context=n_new > room)
    return tokens, min(n_new, room), stats
