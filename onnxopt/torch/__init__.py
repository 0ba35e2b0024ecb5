"""The torch round trip (optional dependency): ONNX graph -> torch module -> weights written back."""
