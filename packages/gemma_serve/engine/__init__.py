"""Portable Gemma engine: paged KV cache, continuous batching, same code on CPU and CUDA.

Imports nothing from `api/` or `triton/`: layers point downward only.
"""
