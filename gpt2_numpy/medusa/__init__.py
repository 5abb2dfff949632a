"""Medusa heads (Cai et al. 2024): drafting without a draft model. Read heads.py (the heads,
their backward pass, Adam, and drafting a token tree from them), then train.py (the text the
target writes itself, and the loop); `python -m gpt2_numpy.medusa train` is __main__.py."""
from .heads import MedusaHeads

__all__ = ["MedusaHeads"]
