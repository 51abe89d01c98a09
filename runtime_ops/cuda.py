"""ctypes bindings of the CUDA kernels' C API (kernels/cuda/api.h), for tests and benchmarks.

Two libraries export that API: `librespin_cuda.so` runs the kernels on a GPU (pointers are device
memory, e.g. `torch.Tensor.data_ptr()`; calls are asynchronous on the given CUDA stream), and
`librespin_cuda_host.so` runs the very same kernel programs on the CPU over every block and thread
index (pointers are host memory; NumPy arrays here). `CudaKernels` wraps either with the same
methods; `HostKernels` adds NumPy conveniences for the host emulation. Both are built by
`runtime_ops.library.build()` into build/kernels/ (the GPU one only where nvcc is found).
Nothing here imports torch or touches a GPU at import time.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime_ops.library import BUILD_DIR

HOST_LIBRARY = BUILD_DIR / "librespin_cuda_host.so"
DEVICE_LIBRARY = BUILD_DIR / "librespin_cuda.so"

DTYPES = {"float32": 0, "float16": 1, "bfloat16": 2}
VARIANTS = {"auto": 0, "mma": 1, "mma_small": 2, "dp4a": 3}


class _Launch(ctypes.Structure):
    _fields_ = [("threads", ctypes.c_int), ("rows_per_block", ctypes.c_int), ("variant", ctypes.c_int)]


@dataclass(frozen=True)
class Launch:
    """Launch-shape overrides (0 / "auto": the launcher's choice)."""
    threads: int = 0
    rows_per_block: int = 0
    variant: str = "auto"

    def as_c(self) -> _Launch:
        return _Launch(self.threads, self.rows_per_block, VARIANTS[self.variant])


class KernelError(RuntimeError):
    """A kernel call refused its arguments or failed to launch (the library's message)."""


_P, _I, _I64, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "respin_hadamard": [_P, _P, _I, _I64, _I, _P, _P],
    "respin_quantize_rows": [_P, _I, _I64, _I, _I, _I, _I, _F, _I, _P, _P, _P, _P, _P],
    "respin_dequantize_rows": [_P, _P, _P, _P, _I64, _I, _I, _P, _P],
    "respin_qmatmul": [_P, _P, _P, _P, _I, _P, _P, _P, _P, _I64, _I, _I, _I, _P, _P],
    "respin_residual_correction": [_P, _P, _P, _P, _P, _I64, _I, _I, _P, _P],
}


class CudaKernels:
    """The C API of one library, on raw addresses (ints). Raises KernelError on a nonzero return."""

    def __init__(self, path: Path):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path} is not built: run `python -m runtime_ops.build`")
        self.path = Path(path)
        self._lib = ctypes.CDLL(str(path))
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(self._lib, name)
            fn.argtypes, fn.restype = argtypes, ctypes.c_int
        self._lib.respin_cuda_last_error.restype = ctypes.c_char_p
        self.is_device = bool(self._lib.respin_cuda_is_device())

    def _call(self, name: str, *args, launch: Launch | None = None, stream: int = 0) -> None:
        c_launch = ctypes.byref(launch.as_c()) if launch else None
        if getattr(self._lib, name)(*args, c_launch, stream or None) != 0:
            raise KernelError(self._lib.respin_cuda_last_error().decode())

    def hadamard(self, x: int, y: int, dtype: str, rows: int, n: int, **kw) -> None:
        self._call("respin_hadamard", x, y, DTYPES[dtype], rows, n, **kw)

    def quantize_rows(self, x: int, dtype: str, rows: int, n: int, transform: bool, bits: int, symmetric: bool,
                      clip: float, packed: bool, q: int, scale: int, zero_point: int, **kw) -> None:
        self._call("respin_quantize_rows", x, DTYPES[dtype], rows, n, int(transform), bits, int(symmetric), clip,
                   int(packed), q, scale, zero_point, **kw)

    def dequantize_rows(self, q: int, scale: int, zero_point: int, y: int, rows: int, d: int, packed: bool,
                        **kw) -> None:
        self._call("respin_dequantize_rows", q, scale, zero_point, y, rows, d, int(packed), **kw)

    def qmatmul(self, xq: int, x_scale: int, x_zp: int, w: int, bits: int, w_scale: int, w_zp: int, bias: int,
                y: int, M: int, K: int, N: int, group_size: int, **kw) -> None:
        self._call("respin_qmatmul", xq, x_scale, x_zp, w, bits, w_scale, w_zp, bias or None, y, M, K, N,
                   group_size, **kw)

    def residual_correction(self, x: int, Q: int, M: int, z: int, y: int, rows: int, D: int, r: int, **kw) -> None:
        self._call("respin_residual_correction", x, Q, M, z or None, y, rows, D, r, **kw)


_FATBIN_MAGIC = 0xBA55ED50


def fatbin_targets(path: Path) -> set[tuple[str, int]]:
    """The GPU code a library embeds, read from its CUDA fat binaries: {("sass" | "ptx", 80), ...}.

    Each fat binary is a header (magic, version, header size, payload size) followed by entries
    (kind 1 = PTX, 2 = ELF/SASS; the compute capability at byte 28 of an entry's header).
    """
    data = Path(path).read_bytes()
    targets: set[tuple[str, int]] = set()
    start = data.find(struct.pack("<I", _FATBIN_MAGIC))
    while start >= 0:
        _, header_size, payload = struct.unpack_from("<HHQ", data, start + 4)
        offset, end = start + header_size, start + header_size + payload
        while offset < end:
            kind, _, entry_header, size = struct.unpack_from("<HHIQ", data, offset)
            arch = struct.unpack_from("<I", data, offset + 28)[0]
            targets.add(({1: "ptx", 2: "sass"}.get(kind, str(kind)), arch))
            offset += entry_header + size
        start = data.find(struct.pack("<I", _FATBIN_MAGIC), end)
    return targets


def _addr(a: np.ndarray) -> int:
    assert a.flags.c_contiguous
    return a.ctypes.data


def _rows(x: np.ndarray) -> tuple[int, int]:
    return (int(np.prod(x.shape[:-1])) if x.ndim > 1 else 1), int(x.shape[-1])


class HostKernels(CudaKernels):
    """The host emulation with NumPy in and out (float16 as np.float16, bfloat16 as uint16 bits)."""

    def __init__(self, path: Path = HOST_LIBRARY):
        super().__init__(path)

    @staticmethod
    def _dtype(x: np.ndarray, bfloat16: bool) -> str:
        if bfloat16:
            assert x.dtype == np.uint16
            return "bfloat16"
        return {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}[x.dtype]

    def run_hadamard(self, x: np.ndarray, bfloat16: bool = False, launch: Launch | None = None) -> np.ndarray:
        x = np.ascontiguousarray(x)
        y = np.empty_like(x)
        rows, n = _rows(x)
        self.hadamard(_addr(x), _addr(y), self._dtype(x, bfloat16), rows, n, launch=launch)
        return y

    def run_quantize(self, x: np.ndarray, bits: int = 8, symmetric: bool = False, clip: float = 1.0,
                     transform: bool = False, packed: bool = False, bfloat16: bool = False,
                     launch: Launch | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(x)
        rows, n = _rows(x)
        lead = x.shape[:-1]
        q = np.empty((*lead, (n + 1) // 2), np.uint8) if packed else np.empty(x.shape, np.int8)
        scale, zp = np.empty((*lead, 1), np.float32), np.empty((*lead, 1), np.int8)
        self.quantize_rows(_addr(x), self._dtype(x, bfloat16), rows, n, transform, bits, symmetric, clip, packed,
                           _addr(q), _addr(scale), _addr(zp), launch=launch)
        return q, scale, zp

    def run_dequantize(self, q: np.ndarray, scale: np.ndarray, zp: np.ndarray, d: int, packed: bool,
                       launch: Launch | None = None) -> np.ndarray:
        q, scale, zp = (np.ascontiguousarray(a) for a in (q, scale, zp))
        rows = int(np.prod(q.shape[:-1])) if q.ndim > 1 else 1
        y = np.empty((*q.shape[:-1], d), np.float32)
        self.dequantize_rows(_addr(q), _addr(scale), _addr(zp), _addr(y), rows, d, packed, launch=launch)
        return y

    def run_qmatmul(self, xq, x_scale, x_zp, w, w_scale, w_zp, bias=None, K: int | None = None, bits: int = 4,
                    group_size: int = 0, launch: Launch | None = None) -> np.ndarray:
        xq, x_scale, x_zp, w, w_scale, w_zp = (np.ascontiguousarray(a) for a in (xq, x_scale, x_zp, w, w_scale, w_zp))
        M, K_x = _rows(xq)
        K = K_x if K is None else K
        N = w.shape[0]
        y = np.empty((*xq.shape[:-1], N), np.float32)
        bias = None if bias is None else np.ascontiguousarray(bias)
        bias_addr = 0 if bias is None else _addr(bias)
        self.qmatmul(_addr(xq), _addr(x_scale), _addr(x_zp), _addr(w), bits, _addr(w_scale), _addr(w_zp),
                     bias_addr, _addr(y), M, K, N, group_size, launch=launch)
        return y

    def run_residual_correction(self, x: np.ndarray, Q: np.ndarray, M: np.ndarray, z: np.ndarray | None = None,
                                launch: Launch | None = None) -> np.ndarray:
        x, Q, M = (np.ascontiguousarray(a, dtype=np.float32) for a in (x, Q, M))
        z = None if z is None else np.ascontiguousarray(z, dtype=np.float32)
        rows, D = _rows(x)
        y = np.empty_like(x)
        self.residual_correction(_addr(x), _addr(Q), _addr(M), 0 if z is None else _addr(z), _addr(y), rows, D,
                                 Q.shape[1], launch=launch)
        return y
