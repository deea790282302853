# Triton's Python backend loads this file; the model itself lives in the gemma_serve package, which
# the Truss puts on the backend's PYTHONPATH.
from gemma_serve.triton.engine_model import TritonPythonModel  # noqa: F401
