"""Build step: ImageNet backbones -> fine-tuned cat/dog classifiers -> verified ONNX + manifest."""
