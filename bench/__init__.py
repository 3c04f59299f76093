import catdog_core  # noqa: F401  (first: it turns onnxruntime telemetry off before onnxruntime loads)
