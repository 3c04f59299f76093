"""What the build (`model_export`), the service (`service`) and the benchmarks (`bench`) share.

One home for each piece that must behave the same on both sides of the manifest: how an image
becomes a model input, how logits become probabilities, how an onnxruntime session is configured
and timed, how files are hashed, which media types are images. Light dependencies only (NumPy,
Pillow, onnxruntime): the service imports it, and must not pull in the training stack.
"""
