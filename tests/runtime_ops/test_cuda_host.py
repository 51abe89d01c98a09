"""The CUDA kernels' programs (kernels/cuda/), executed on the CPU by the host executor over every
block and thread index of their grids (librespin_cuda_host.so), against `runtime_ops.reference` and
the CPU kernels.

The GPU kernels are these same programs (exec.cuh), so what is checked here is their arithmetic,
indexing, shared-memory use, warp butterflies and mma fragment layout; only the device intrinsics
behind the executor run nowhere without a GPU (tests/runtime_ops/test_cuda_device.py runs them
where one is present). Launch shapes are varied (threads, rows per block, GEMM variant) so that
more than the default decomposition is covered. Where the reference is float32 step for step, and
for the integer GEMM, results must be bit-exact; the float transforms are bit-exact with the CPU
kernels and within 1e-5 (relative) of the float64 reference.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from rotations.hadamard import hadamard_factorization
from runtime_ops import reference
from runtime_ops.cuda import DEVICE_LIBRARY, HostKernels, KernelError, Launch, fatbin_targets
from runtime_ops.library import build, library_path, session_options
from runtime_ops.schema import DOMAIN, OPSET_VERSION

REL_TOL = 1e-5


@pytest.fixture(scope="module")
def kernels() -> HostKernels:
    build()
    return HostKernels()


def cpu_kernel(op: str, inputs: dict[str, np.ndarray], **attrs) -> np.ndarray:
    """The CPU kernel of `op` (librespin_ops.so in onnxruntime) on `inputs`: its float32 output."""
    node = helper.make_node(op, list(inputs), ["y"], domain=DOMAIN, **attrs)
    infos = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for k, v in inputs.items()]
    graph = helper.make_graph([node], op, infos, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, OPSET_VERSION)],
                              ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), session_options(True, 1), providers=["CPUExecutionProvider"])
    return session.run(None, inputs)[0]


def assert_close(actual: np.ndarray, expected: np.ndarray, tol: float = REL_TOL) -> None:
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-30)
    err = float(np.abs(actual.astype(np.float64) - expected.astype(np.float64)).max(initial=0.0))
    assert err / scale <= tol, f"max |err| {err:.3g} vs max |ref| {scale:.3g}"


def outliers(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Gaussian values with a few large outliers, as LLM activations have."""
    x = rng.standard_normal(shape).astype(np.float32)
    x.flat[rng.integers(0, x.size, max(1, x.size // 50))] *= 40
    return x


# ---------------------------------------------------------------------------------- Hadamard

HADAMARD_SIZES = [1, 2, 4, 12, 20, 28, 36, 40, 64, 96, 128, 576, 1536, 5120]
LAUNCHES = [None, Launch(threads=32), Launch(threads=64, rows_per_block=1), Launch(threads=96, rows_per_block=1),
            Launch(threads=128, rows_per_block=8), Launch(threads=1024, rows_per_block=2)]


@pytest.mark.parametrize("n", HADAMARD_SIZES)
@pytest.mark.parametrize("rows", [1, 3, 7])
def test_hadamard_equals_cpu_kernel_and_reference(kernels, n, rows):
    x = outliers(np.random.default_rng(n * 10 + rows), (rows, n))
    y = kernels.run_hadamard(x)
    m = hadamard_factorization(n)[1]
    np.testing.assert_array_equal(y, cpu_kernel("Hadamard", {"X": x}, n=n, m=m))
    assert_close(y, reference.hadamard(x, n, m))


@pytest.mark.parametrize("launch", LAUNCHES, ids=str)
@pytest.mark.parametrize("n", [12, 64, 576])
def test_hadamard_launch_shapes_agree(kernels, launch, n):
    x = outliers(np.random.default_rng(n), (2, 3, 5, n))  # leading dims fold into rows (30 rows)
    default = kernels.run_hadamard(x)
    np.testing.assert_array_equal(kernels.run_hadamard(x, launch=launch), default)
    assert_close(default, reference.hadamard(x, n, hadamard_factorization(n)[1]))


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bits, round to nearest even (NaN-free inputs)."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _bf16_values(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


@pytest.mark.parametrize("n", [2, 12, 64, 576])
def test_hadamard_float16_rounds_the_float32_result(kernels, n):
    x = outliers(np.random.default_rng(n), (5, n)).astype(np.float16)
    x[0, : n // 2] = np.float16(3e-7)  # subnormal halves in, subnormal results out
    y = kernels.run_hadamard(x)
    assert y.dtype == np.float16
    exact = cpu_kernel("Hadamard", {"X": x.astype(np.float32)}, n=n, m=hadamard_factorization(n)[1])
    np.testing.assert_array_equal(y.view(np.uint16), exact.astype(np.float16).view(np.uint16))


@pytest.mark.parametrize("n", [2, 64, 1536])
def test_hadamard_bfloat16_rounds_the_float32_result(kernels, n):
    bits = _bf16_bits(outliers(np.random.default_rng(n), (3, n)))
    y = kernels.run_hadamard(bits, bfloat16=True)
    exact = cpu_kernel("Hadamard", {"X": _bf16_values(bits)}, n=n, m=hadamard_factorization(n)[1])
    np.testing.assert_array_equal(y, _bf16_bits(exact))
    assert_close(_bf16_values(y), exact, tol=2**-8)


def test_float16_conversions_are_exact_on_every_half(kernels):
    """n = 1 is the identity: every finite half goes through float32 and back unchanged."""
    halves = np.arange(0, 1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    halves = halves[np.isfinite(halves)].reshape(-1, 1)
    np.testing.assert_array_equal(kernels.run_hadamard(halves).view(np.uint16), halves.view(np.uint16))


# ------------------------------------------------------------------ quantization (and fused)

@pytest.mark.parametrize("bits,symmetric,clip", [(8, False, 1.0), (4, False, 1.0), (4, True, 1.0), (8, True, 0.9),
                                                 (3, False, 0.95), (2, True, 1.0)])
@pytest.mark.parametrize("n", [1, 5, 64, 576, 1536])
def test_dynamic_quantize_is_bit_exact(kernels, bits, symmetric, clip, n):
    x = outliers(np.random.default_rng(bits * 1000 + n), (7, n))
    got = kernels.run_quantize(x, bits=bits, symmetric=symmetric, clip=clip)
    for a, e in zip(got, reference.dynamic_quantize(x, bits, int(symmetric), clip), strict=True):
        np.testing.assert_array_equal(a, e)


@pytest.mark.parametrize("launch", LAUNCHES, ids=str)
def test_quantize_launch_shapes_agree(kernels, launch):
    """Rows split over several warps (partials in shared memory) or several rows per warp."""
    x = outliers(np.random.default_rng(1), (13, 576))
    expected = reference.dynamic_quantize(x, 4, 0, 1.0)
    for a, e in zip(kernels.run_quantize(x, bits=4, launch=launch), expected, strict=True):
        np.testing.assert_array_equal(a, e)


@pytest.mark.parametrize("n,bits", [(64, 4), (576, 4), (1536, 8), (12, 4)])
def test_fused_hadamard_quantize_equals_the_two_ops(kernels, n, bits):
    """Hadamard → DynamicQuantize in one pass: the CPU kernels' two ops, bit for bit."""
    x = outliers(np.random.default_rng(n + bits), (9, n))
    rotated = cpu_kernel("Hadamard", {"X": x}, n=n, m=hadamard_factorization(n)[1])
    for launch in (None, Launch(threads=256, rows_per_block=1)):
        got = kernels.run_quantize(x, bits=bits, transform=True, launch=launch)
        for a, e in zip(got, reference.dynamic_quantize(rotated, bits, 0, 1.0), strict=True):
            np.testing.assert_array_equal(a, e)


@pytest.mark.parametrize("d", [1, 7, 64, 128])
def test_kv_cache_pack_and_unpack(kernels, d):
    x = outliers(np.random.default_rng(d), (2, 3, 5, d))  # [batch, heads, tokens, head_dim]
    q, scale, zp = kernels.run_quantize(x, bits=4, packed=True)
    rq, rscale, rzp = reference.quantize_kv(x, 4)
    for a, e in ((q, rq), (scale, rscale), (zp, rzp)):
        np.testing.assert_array_equal(a, e)
    np.testing.assert_array_equal(kernels.run_dequantize(q, scale, zp, d, packed=True),
                                  reference.dequantize_kv(rq, rscale, rzp, 4, d))
    q8, s8, z8 = reference.quantize_kv(x, 8)
    np.testing.assert_array_equal(kernels.run_dequantize(q8, s8, z8, d, packed=False, launch=Launch(threads=32)),
                                  reference.dequantize_kv(q8, s8, z8, 8, d))


def test_fused_hadamard_kv_cache(kernels):
    """R3 then the 4-bit cache in one pass (head_dim 64)."""
    x = outliers(np.random.default_rng(5), (3, 11, 64))
    rotated = cpu_kernel("Hadamard", {"X": x}, n=64, m=1)
    got = kernels.run_quantize(x, bits=4, transform=True, packed=True)
    for a, e in zip(got, reference.quantize_kv(rotated, 4), strict=True):
        np.testing.assert_array_equal(a, e)


# ------------------------------------------------------------------------------------ QMatMul

def qmatmul_operands(rng, M, K, N, bits, group_size, abits=4, bias=True):
    G = 1 if group_size == 0 else -(-K // group_size)
    ahalf, whalf = 2 ** (abits - 1), 2 ** (bits - 1)
    xq = rng.integers(-ahalf, ahalf, (M, K)).astype(np.int8)
    x_scale = (rng.random((M, 1)) + 0.1).astype(np.float32)
    x_zp = rng.integers(-ahalf, ahalf, (M, 1)).astype(np.int8)
    wq = rng.integers(-whalf, whalf, (N, K)).astype(np.int8)
    w = reference.pack_int4(wq) if bits == 4 else wq
    w_scale = (rng.random((N, G)) * 0.1).astype(np.float32)
    w_zp = rng.integers(-whalf // 2, whalf // 2, (N, G)).astype(np.int8)
    b = rng.standard_normal(N).astype(np.float32) if bias else None
    return xq, x_scale, x_zp, w, w_scale, w_zp, b


VARIANTS = ["auto", "mma", "mma_small", "dp4a"]


@pytest.mark.parametrize("M,K,N", [(1, 576, 130), (3, 45, 7), (17, 200, 70), (70, 576, 1), (130, 96, 129)])
@pytest.mark.parametrize("group_size", [0, 32, 64])
@pytest.mark.parametrize("variant", VARIANTS)
def test_qmatmul_w4a4_is_bit_exact(kernels, M, K, N, group_size, variant):
    rng = np.random.default_rng(M * K + N + group_size)
    ops = qmatmul_operands(rng, M, K, N, 4, group_size)
    got = kernels.run_qmatmul(*ops, K=K, bits=4, group_size=group_size, launch=Launch(variant=variant))
    np.testing.assert_array_equal(got, reference.qmatmul(*ops, K=K, bits=4, group_size=group_size))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("bits,abits,group_size", [(8, 8, 0), (4, 8, 128), (8, 8, 96), (4, 4, 30), (4, 4, 17)])
def test_qmatmul_other_bits_and_groups(kernels, variant, bits, abits, group_size):
    rng = np.random.default_rng(bits + abits + group_size)
    M, K, N = 21, 300, 40
    ops = qmatmul_operands(rng, M, K, N, bits, group_size, abits=abits, bias=False)
    expected = reference.qmatmul(*ops, K=K, bits=bits, group_size=group_size)
    launch = Launch(variant=variant)
    if variant.startswith("mma") and group_size % 32:
        with pytest.raises(KernelError, match="multiple of 32"):
            kernels.run_qmatmul(*ops, K=K, bits=bits, group_size=group_size, launch=launch)
        return
    np.testing.assert_array_equal(kernels.run_qmatmul(*ops, K=K, bits=bits, group_size=group_size, launch=launch),
                                  expected)


def test_qmatmul_leading_dims_and_cpu_kernel(kernels):
    rng = np.random.default_rng(3)
    xq, x_scale, x_zp, w, w_scale, w_zp, b = qmatmul_operands(rng, 10, 64, 24, 4, 0)
    xq, x_scale, x_zp = xq.reshape(2, 5, 64), x_scale.reshape(2, 5, 1), x_zp.reshape(2, 5, 1)
    got = kernels.run_qmatmul(xq, x_scale, x_zp, w, w_scale, w_zp, b, K=64)
    cpu = cpu_kernel("QMatMul", {"Xq": xq, "x_scale": x_scale, "x_zero_point": x_zp, "W": w, "w_scale": w_scale,
                                 "w_zero_point": w_zp, "bias": b}, K=64, bits=4, group_size=0)
    np.testing.assert_array_equal(got, cpu)


# ------------------------------------------------------------------------ ResidualCorrection

@pytest.mark.parametrize("D,r", [(16, 1), (96, 8), (576, 32), (130, 0), (256, 128)])
@pytest.mark.parametrize("rows", [1, 5, 33])
def test_residual_correction_equals_cpu_kernel(kernels, D, r, rows):
    rng = np.random.default_rng(D + r + rows)
    x = outliers(rng, (rows, D))
    Q = np.linalg.qr(rng.standard_normal((D, max(r, 1))))[0][:, :r].astype(np.float32)
    M = (rng.standard_normal((r, r)) * 0.1).astype(np.float32)
    y = kernels.run_residual_correction(x, Q, M)
    np.testing.assert_array_equal(y, cpu_kernel("ResidualCorrection", {"X": x, "Q": Q, "M": M}))
    assert_close(y, reference.residual_correction(x, Q, M))
    for launch in (Launch(threads=32, rows_per_block=1), Launch(threads=512, rows_per_block=4)):
        np.testing.assert_array_equal(kernels.run_residual_correction(x, Q, M, launch=launch), y)
    z = outliers(rng, (rows, D))  # the residual's add fused in, last
    np.testing.assert_array_equal(kernels.run_residual_correction(x, Q, M, z), y + z)
    np.testing.assert_array_equal(kernels.run_residual_correction(x, Q, M, z),
                                  cpu_kernel("ResidualCorrection", {"X": x, "Q": Q, "M": M, "Z": z}))


# -------------------------------------------------------------------------------- bad input

def test_bad_arguments_are_errors_not_crashes(kernels):
    x = np.ones((2, 86), np.float32)
    with pytest.raises(KernelError, match="no Hadamard construction of size n = 86"):
        kernels.run_hadamard(x)
    with pytest.raises(KernelError, match="shared memory"):  # 2^16 floats do not fit one block
        kernels.run_hadamard(np.ones((1, 65536), np.float32))
    with pytest.raises(KernelError, match="multiple of 32"):
        kernels.run_hadamard(np.ones((2, 64), np.float32), launch=Launch(threads=48))
    with pytest.raises(KernelError, match="power of two"):
        kernels.run_hadamard(np.ones((2, 64), np.float32), launch=Launch(rows_per_block=3))
    with pytest.raises(KernelError, match="bits must be in"):
        kernels.run_quantize(np.ones((2, 8), np.float32), bits=9)
    with pytest.raises(KernelError, match="packed codes need bits = 4"):
        kernels.run_quantize(np.ones((2, 8), np.float32), bits=8, packed=True)
    with pytest.raises(KernelError, match="rank r = 129"):
        kernels.run_residual_correction(np.ones((2, 200), np.float32), np.ones((200, 129), np.float32),
                                        np.ones((129, 129), np.float32))
    with pytest.raises(KernelError, match="K = 131073"):
        kernels.qmatmul(0, 0, 0, 0, 8, 0, 0, 0, 0, 1, 131073, 1, 0)


def test_zero_rows_launch_nothing(kernels):
    assert kernels.run_hadamard(np.ones((0, 64), np.float32)).shape == (0, 64)
    q, scale, _ = kernels.run_quantize(np.ones((0, 64), np.float32), bits=4, packed=True)
    assert q.shape == (0, 32) and scale.shape == (0, 1)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no CUDA compiler on this machine")
def test_device_libraries_hold_sm80_and_sm90_code():
    """Where nvcc exists the build compiles the kernels (warnings as errors) into machine code for
    sm_80 and sm_90, in the C-API library and in the onnxruntime library (its CUDA-EP kernels)."""
    build()
    for path in (DEVICE_LIBRARY, library_path()):
        assert {("sass", 80), ("sass", 90)} <= fatbin_targets(path), path


def test_benchmark_script_runs_in_smoke_mode(tmp_path):
    """benchmarks/cuda_kernels.py, every path (tables, decoder layer) on the host emulation."""
    import json
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "cuda_kernels.py"
    out = tmp_path / "smoke.json"
    subprocess.run([sys.executable, str(script), "--smoke", "--out", str(out)], check=True, capture_output=True)
    result = json.loads(out.read_text())
    kernels = {r["kernel"] for r in result["rows"]}
    assert {"hadamard", "hadamard_quantize", "qmatmul", "residual_correction", "decoder_layer"} <= kernels
    assert any("no Hadamard construction" in r.get("error", "") for r in result["rows"])
    assert set(result["online_overhead"]) == {"prefill", "decode"}
