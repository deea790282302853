# Triton's Python backend loads this file. The model itself lives in the gemma_serve package; the
# backend stub runs an isolated interpreter that ignores PYTHONPATH, so the package's location comes
# from the rendered config (parameter "python_path") and is put on sys.path here.
import json
import sys


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"]).get("parameters", {})
        path = params.get("python_path", {}).get("string_value", "")
        if path and path not in sys.path:
            sys.path.insert(0, path)
        from gemma_serve.triton.engine_model import EngineModel

        self._model = EngineModel()
        self._model.initialize(args)

    async def execute(self, requests):
        return await self._model.execute(requests)

    def finalize(self):
        self._model.finalize()
