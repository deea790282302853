"""Gemma serving: Truss API layer -> Triton (gRPC) -> TensorRT-LLM or the portable PyTorch engine."""

__version__ = "0.1.0"
