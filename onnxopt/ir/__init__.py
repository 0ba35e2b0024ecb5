"""The graph-editing layer every pass and tool shares: :mod:`onnxopt.ir.graph` (the
onnx-graphsurgeon side) and :mod:`onnxopt.ir.proto` (the protobuf side)."""
