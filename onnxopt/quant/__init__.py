"""Quantization machinery shared by the qdq pass and its companions: calibration, targets, rule checks."""
