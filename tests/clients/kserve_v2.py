"""KServe's own v2 REST client (`kserve.InferenceRESTClient`) against a live server: run in the
kserve venv (make .venv-kserve), whose dependencies (kubernetes, grpcio, pandas) stay out of the
project's. Prints one JSON object: readiness, and per input form the labels and probabilities.

    python tests/clients/kserve_v2.py URL MODEL IMAGE [IMAGE ...]
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from pathlib import Path

import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig


async def main(url: str, model: str, paths: list[str]) -> dict[str, object]:
    blobs = [Path(p).read_bytes() for p in paths]
    client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=60))
    try:
        results: dict[str, object] = {"ready": await client.is_model_ready(url, model)}
        forms = {
            "binary": (np.array(blobs, dtype=np.object_), True),
            "json": (np.array([base64.b64encode(b).decode() for b in blobs], dtype=np.object_), False),
        }
        for form, (tensor, binary) in forms.items():
            image = InferInput(name="image", shape=[len(blobs)], datatype="BYTES")
            image.set_data_from_numpy(tensor, binary_data=binary)
            if not binary:
                image.parameters = {"content_type": "base64"}
            response = await client.infer(
                url, InferRequest(model, [image], request_id=form), model_name=model
            )
            outputs = {o.name: o.as_numpy() for o in response.outputs}
            results[form] = {
                "id": response.id,
                "labels": [v.decode() if isinstance(v, bytes) else str(v) for v in outputs["label"]],
                "probabilities": outputs["probabilities"].astype(float).tolist(),
            }
        return results
    finally:
        await client.close()


if __name__ == "__main__":
    sys.stdout.write(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3:]))) + "\n")
