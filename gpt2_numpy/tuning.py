"""The one call that changes the process: `tune_process()`. Imports no NumPy.

What it sets holds for the whole process, so it is the application's choice, not the library's:
main.py and `python -m bench` call it first thing; a program that imports gpt2_numpy into its
own process calls it if it wants the same speed, before anything imports NumPy.
"""
from ._malloc import keep_freed_memory
from ._openblas import prefer_haswell_kernels


def tune_process() -> None:
    """Pick OpenBLAS's Haswell kernels (_openblas.py: only before NumPy is imported, and only
    where they help and nobody chose otherwise) and make malloc keep freed memory for the next
    token's arrays (_malloc.py: glibc only). Neither changes a result, only speed.
    GPT2_OPENBLAS_DEFAULT=1 and GPT2_MALLOC_DEFAULT=1 turn either off."""
    prefer_haswell_kernels()  # before anything imports NumPy: OpenBLAS reads it once
    keep_freed_memory()  # each token's vocabulary-sized arrays reuse the same pages
