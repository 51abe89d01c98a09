"""Custom onnxruntime ops of the ONNX export (domain `respin`): schemas, references, function bodies.

Only the schema exists so far (the ONNX exporter is a later stage); see `runtime_ops.schema`.
"""
