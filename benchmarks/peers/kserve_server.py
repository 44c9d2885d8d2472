"""KServe Python model server (kserve 0.21) serving a TorchScript model; runs in the kserve venv.

    kserve_server.py --model-dir DIR --name digits --grpc-port P --http-port H

``DIR/CURRENT`` names the version directory to load (``DIR/<version>/model.pt``). A version
change is KServe's own reload: write CURRENT, then ``POST /v2/repository/models/NAME/load``
on the REST port; the repository builds and loads a new model object, then replaces the old.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer
from kserve.model_repository import ModelRepository


class TorchScriptModel(Model):
    def __init__(self, name: str, root: Path) -> None:
        super().__init__(name)
        self.root = root
        self.load()

    def load(self) -> bool:
        torch.set_num_threads(1)
        self.version = (self.root / "CURRENT").read_text().strip()
        self.model = torch.jit.load(str(self.root / self.version / "model.pt")).eval()
        with torch.inference_mode():
            self.model(torch.zeros(1, 64))
        self.ready = True
        return True

    def get_input_types(self) -> list[dict]:  # type: ignore[type-arg]
        return [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]

    def get_output_types(self) -> list[dict]:  # type: ignore[type-arg]
        return [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]

    async def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:  # type: ignore[no-untyped-def, override]
        x = payload.inputs[0].as_numpy()
        with torch.inference_mode():
            y = self.model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()
        out = InferOutput(name="probabilities", shape=list(y.shape), datatype="FP32")
        out.set_data_from_numpy(y, binary_data=True)
        return InferResponse(response_id=payload.id, model_name=self.name, model_version=self.version,
                             infer_outputs=[out])


class Repository(ModelRepository):
    def __init__(self, root: Path, name: str) -> None:
        super().__init__()
        self.root, self.name = root, name

    async def load(self, name: str) -> bool:  # type: ignore[override]
        model = TorchScriptModel(name, self.root)
        self.update(model)
        return model.ready


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--name", default="digits")
    ap.add_argument("--grpc-port", type=int, required=True)
    ap.add_argument("--http-port", type=int, required=True)
    args = ap.parse_args()
    repo = Repository(args.model_dir, args.name)
    model = TorchScriptModel(args.name, args.model_dir)
    repo.update(model)
    ModelServer(grpc_port=args.grpc_port, http_port=args.http_port, workers=1,
                registered_models=repo, enable_docs_url=False).start([model])


if __name__ == "__main__":
    main()
