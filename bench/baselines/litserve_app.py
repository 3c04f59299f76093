"""Baseline: LitServe with its own batching, serving one model from the same ONNX files.

Run: CATDOG_MODELS_DIR=models CATDOG_BENCH_MODEL=mobilenet python -m bench.baselines.litserve_app 8100
Requests are LitServe's idiomatic JSON: {"image": "<base64 JPEG>"}.
"""

from __future__ import annotations

import base64
import io
import os
import sys
from pathlib import Path
from typing import Any

import litserve as ls
import numpy as np
import onnxruntime as ort
from PIL import Image

from service.manifest import load_manifest


class CatDogAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        models = Path(os.environ.get("CATDOG_MODELS_DIR", "models"))
        self.entry = load_manifest(models / "manifest.json").models[os.environ["CATDOG_BENCH_MODEL"]]
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(os.environ.get("CATDOG_INTRA_OP_THREADS", "2"))
        self.session = ort.InferenceSession(
            str(models / self.entry.file), options, providers=["CPUExecutionProvider"]
        )

    # No annotation on `request`: LitServe would take one as a request model to validate against
    # (every request then got 422); unannotated, it passes the parsed JSON body.
    def decode_request(self, request):
        image = Image.open(io.BytesIO(base64.b64decode(request["image"]))).convert("RGB")
        size = (self.entry.input.width, self.entry.input.height)
        return np.asarray(image.resize(size, Image.Resampling.BILINEAR), np.uint8)

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.entry.input.name: x})[0]

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output)

    def encode_response(self, logits: np.ndarray) -> dict[str, Any]:
        scaled = np.exp(logits / self.entry.temperature)
        probs = scaled / scaled.sum()
        return {"label": self.entry.labels[int(probs.argmax())], "probabilities": probs.tolist()}


if __name__ == "__main__":
    api = CatDogAPI(max_batch_size=8, batch_timeout=0.002)
    ls.LitServer(api, accelerator="cpu", workers_per_device=1).run(
        port=int(sys.argv[1]), generate_client_file=False
    )
