"""Baseline: the FastAPI + onnxruntime handler people write by hand (sync endpoint, no batching).

Run: CATDOG_MODELS_DIR=models uvicorn bench.baselines.plain_fastapi:app --port 8100
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
from fastapi import Body, FastAPI
from PIL import Image

from service.manifest import load_manifest

MODELS = Path(os.environ.get("CATDOG_MODELS_DIR", "models"))
THREADS = int(os.environ.get("CATDOG_INTRA_OP_THREADS", "2"))
manifest = load_manifest(MODELS / "manifest.json")
options = ort.SessionOptions()
options.intra_op_num_threads = THREADS
sessions = {
    name: ort.InferenceSession(str(MODELS / e.file), options, providers=["CPUExecutionProvider"])
    for name, e in manifest.models.items()
}
app = FastAPI()


@app.post("/classify")
def classify(model: str, body: bytes = Body(..., media_type="image/jpeg")) -> dict[str, object]:
    entry = manifest.models[model]
    image = (
        Image.open(io.BytesIO(body))
        .convert("RGB")
        .resize((entry.input.width, entry.input.height), Image.Resampling.BILINEAR)
    )
    logits = sessions[model].run(None, {entry.input.name: np.asarray(image, np.uint8)[None]})[0][0]
    probs = np.exp(logits / entry.temperature) / np.exp(logits / entry.temperature).sum()
    return {"label": entry.labels[int(probs.argmax())], "probabilities": probs.tolist()}
