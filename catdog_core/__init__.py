"""What the build (`model_export`), the service (`service`) and the benchmarks (`bench`) share.

One home for each piece that must behave the same on both sides of the manifest: how an image
becomes a model input, how logits become probabilities, how an onnxruntime session is configured
and timed, how files are hashed, which media types are images. Light dependencies only (NumPy,
Pillow, onnxruntime): the service imports it, and must not pull in the training stack.
"""

import os

# onnxruntime >= 1.29 on Linux sends usage telemetry to Microsoft (a process event, then session,
# model and execution-provider events) and keeps a device id and an event queue under ~/.cache,
# unless ORT_DISABLE_TELEMETRY=1 is set before it initialises. A server that others run should
# not phone home unless its operator says so: ORT_DISABLE_TELEMETRY=0 lets it (README, "Privacy").
# service, model_export and bench import this package before anything imports onnxruntime.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
