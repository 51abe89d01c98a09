"""Custom onnxruntime ops of the ONNX export (domain `respin`): schemas, references, function bodies.

`runtime_ops.schema` names the ops, `runtime_ops.reference` is their NumPy ground truth,
`runtime_ops.functions` their ONNX function bodies, and `runtime_ops.library` finds, builds
(`python -m runtime_ops.build`) and registers the compiled kernels. `library_path`, `available`
and `session_options` are re-exported lazily: importing this package loads neither onnxruntime
nor the library.
"""

_LIBRARY_EXPORTS = ("library_path", "available", "session_options")


def __getattr__(name: str):
    if name in _LIBRARY_EXPORTS:
        from runtime_ops import library

        return getattr(library, name)
    raise AttributeError(f"module 'runtime_ops' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LIBRARY_EXPORTS])
