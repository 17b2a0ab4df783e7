"""The ONNX model folder: graph variants, their gates, the model card."""
