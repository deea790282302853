"""Triton process lifecycle, the gRPC streaming client, and the model repository.

The tensor contract in `contract.py` is shared by the client, the portable engine's Triton model and
the TensorRT-LLM template, so the three cannot drift apart.
"""
