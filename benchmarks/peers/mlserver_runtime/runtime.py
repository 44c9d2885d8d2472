"""MLServer custom runtime serving a TorchScript model (loaded by MLServer from model-settings.json).

``parameters.uri`` points at ``<model>/<version>/model.pt``; responses carry that version,
so the bench harness attributes them like swapserve's.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class TorchScriptRuntime(MLModel):
    async def load(self) -> bool:
        torch.set_num_threads(1)
        uri = Path(self.settings.parameters.uri)
        self._version = uri.parent.name
        self._model = torch.jit.load(str(uri)).eval()
        with torch.inference_mode():
            self._model(torch.zeros(1, 64))
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0])
        with torch.inference_mode():
            y = self._model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()
        return InferenceResponse(model_name=self.name, model_version=self._version, id=payload.id,
                                 outputs=[NumpyCodec.encode_output("probabilities", y)])
