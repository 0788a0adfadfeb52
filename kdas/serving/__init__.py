"""Shipping models: inference on torch, the ONNX export and its runtime (no torch), the maps
and the image codec of the served model."""
