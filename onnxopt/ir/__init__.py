"""The graph-editing layer every pass and tool shares.

* :mod:`onnxopt.ir.graph` -- the onnx-graphsurgeon side: import/export (the overridable graph
  inputs survive the round trip), the rewrite guards (``is_weight``, ``can_absorb``), the edit
  helpers (``swap_input``, ``replace_tensor``, ``drop_detached``) and the name generator.
* :mod:`onnxopt.ir.proto` -- the protobuf side: producer/consumer indexes and the one shape
  inference entry point with its one failure policy.
"""
