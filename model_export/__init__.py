"""Build step: ImageNet backbones -> fine-tuned cat/dog classifiers -> verified ONNX + manifest."""

import catdog_core  # noqa: F401  (first: it turns onnxruntime telemetry off before onnxruntime loads)
