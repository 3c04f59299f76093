"""Baselines that catdog-serve is compared with on the same ONNX files and machine."""
