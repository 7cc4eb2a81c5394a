"""Weights in and out: the official MonoFormer layout, HF Llama (TinyLlama), checks.

official.py        the one key map official <-> ours, both directions, configs
llama.py           a fresh MonoFormer from an HF Llama, initialised as the reference
verify.py          a reference fixture through the converter, errors per output
__main__.py        `python -m monoformer_jax.convert official|to-official|llama|verify-official`
"""
