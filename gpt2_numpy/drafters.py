"""Drafting without a draft model: prompt lookup, for chains and for token trees.

NGramDrafter looks up the most recent earlier occurrence of the context's last n tokens (the
prompt and the output so far; n from n_max down to 1) and proposes the tokens that followed it.
Text that quotes its prompt or repeats itself (code, lists, names) is drafted for free; where
nothing matches it proposes nothing and the round is a plain target step.

The proposal is deterministic, so each q_i is one-hot at x_i. The accept rule then keeps x_i with
probability min(1, p_i(x_i) / 1) = p_i(x_i), and the residual norm(max(0, p_i - q_i)) is p_i
with x_i removed: the output is still exactly the target's (the proof never needs q to come
from a model, only that x_i ~ q_i).
"""
import time
from typing import List

import numpy as np

from .decoding import Drafter
from .tree import Tree, TreeDrafter


def lookup(tokens: List[int], K: int, n_max: int = 3) -> List[int]:
    """Up to K tokens that followed the latest earlier occurrence of the last n tokens, for the
    largest n <= n_max that occurred before; [] if even the last token is new."""
    for n in range(min(n_max, len(tokens) - 1), 0, -1):
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):  # latest first, never the suffix itself
            if tokens[start : start + n] == suffix:
                # Copy what followed, LZ77-style: the copy may run into tokens it has just copied,
                # so a repeating run "a b a b" continues "a b ..." for as long as K asks.
                copy = list(tokens)
                for i in range(start + n, start + n + K):
                    copy.append(copy[i])
                return copy[len(tokens) :]
    return []


class NGramDrafter(Drafter, TreeDrafter):
    """Proposes continuations found in the context itself, as a chain (propose) or a token tree
    (draft); no model, no cache."""

    def __init__(self, n_vocab: int, n_max: int = 3):
        self.n_vocab, self.n_max = n_vocab, n_max
        self.seconds, self.calls = 0.0, 0

    def start(self, tokens: List[int], capacity: int) -> None:
        self.seconds, self.calls = 0.0, 0  # nothing to prefill: the context is the whole model

    def propose(self, tokens: List[int], K: int, warp, rng):
        """(drafts, q [len(drafts), V] one-hot); the warp and rng are not needed: no sampling."""
        start = time.perf_counter()
        drafts = lookup(tokens, K, self.n_max)
        q = np.zeros((len(drafts), self.n_vocab))
        q[np.arange(len(drafts)), drafts] = 1.0  # x_i ~ q_i with q_i one-hot at x_i
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return drafts, q

    def rollback(self, tokens: List[int]) -> None:
        pass  # no state: every lookup reads the committed tokens afresh

    def draft(self, tokens: List[int], widths, warp, rng) -> Tree:
        """A token tree of earlier continuations (ngram_tree); no sampling."""
        self.calls += 1
        return ngram_tree(self, tokens, widths)


def lookup_branches(tokens: List[int], n_branches: int, K: int, n_max: int = 3) -> List[List[int]]:
    """Up to n_branches different continuations of up to K tokens, for a token tree: what
    followed each earlier occurrence of the context's last n tokens, latest first, for n from
    n_max down to 1 (the longest matches first). lookup's first branch is lookup's answer."""
    branches = []
    for n in range(min(n_max, len(tokens) - 1), 0, -1):
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                followed = tokens[start + n : start + n + K]  # then LZ77-style, as in lookup
                branch = [followed[i % len(followed)] for i in range(K)]
                if branch not in branches:
                    branches.append(branch)
                if len(branches) == n_branches:
                    return branches
    return branches


def ngram_tree(drafter: NGramDrafter, tokens: List[int], widths) -> Tree:
    """A tree of earlier continuations of the context's end: lookup_branches' branches merged
    where they share a prefix, a node at depth d - 1 with at most w_d = widths[d - 1] children
    (a branch that would give it more is cut there)."""
    tree = Tree(tokens[-1])
    n_leaves = int(np.prod(widths)) if len(widths) else 0
    for branch in lookup_branches(tokens, n_leaves, len(widths), drafter.n_max) if n_leaves else []:
        node = 0
        for token, w in zip(branch, widths):
            same = [c for c in tree.children[node] if tree.tokens[c] == token]
            if not same and len(tree.children[node]) == w:
                break  # this node is full: the rest of the branch is dropped
            node = same[0] if same else tree.add(node, token)
    return tree
