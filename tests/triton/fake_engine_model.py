"""A stand-in for the engine, to test the Triton layer (server lifecycle, client streaming,
cancellation, error tags) in isolation. It streams the prompt's tokens back in reverse order."""

import asyncio
import json
import os
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        behaviour = os.environ.get("FAKE_ENGINE_INIT", "")
        if behaviour == "fail":
            raise RuntimeError("fake engine refused to start: weights not found")
        if behaviour == "slow":
            time.sleep(120)
        self.events = os.environ["FAKE_ENGINE_EVENTS"]

    def _log(self, **event):
        with open(self.events, "a") as f:
            f.write(json.dumps(event) + "\n")

    async def execute(self, requests):
        await asyncio.gather(*(self._one(r) for r in requests))

    async def _one(self, request):
        sender = request.get_response_sender()
        inputs = {t.name(): t.as_numpy() for t in request.inputs()}
        ids = inputs["input_ids"].reshape(-1).tolist()
        n = int(inputs["request_output_len"].reshape(-1)[0])
        if ids[0] in (998, 999):
            kind = "invalid_request" if ids[0] == 999 else "overloaded"
            sender.send(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(f"[{kind}] fake says no")),
                        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return
        out = ids[::-1][:n]
        for i, token in enumerate(out):
            if sender.is_cancelled():
                self._log(event="cancelled", rid=request.request_id(), at=i)
                sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                return
            await asyncio.sleep(0.02)
            tensors = [pb_utils.Tensor("output_ids", np.array([[[token]]], np.int32)),
                       pb_utils.Tensor("sequence_length", np.array([[len(ids) + i + 1]], np.int32))]
            last = i == len(out) - 1
            sender.send(pb_utils.InferenceResponse(output_tensors=tensors),
                        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if last else 0)
        self._log(event="finished", rid=request.request_id())
