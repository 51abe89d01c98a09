"""The compiled `respin` kernels (kernels/) against `runtime_ops.reference`, one-node models each.

Bit-exact where the reference is float32 step for step (DynamicQuantize, QuantizeKV, DequantizeKV),
max |err| / max |ref| <= 1e-5 elsewhere. Bad input must come back as an onnxruntime exception
carrying the kernel's message, never a crash. The session fixture builds the library (an
incremental build when it is already built); a build failure fails the tests.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from rotations.hadamard import hadamard_factorization, hadamard_matrix
from runtime_ops import reference
from runtime_ops.library import ENV_VAR, build, library_path, session_options
from runtime_ops.schema import DOMAIN, OPSET_VERSION

OPSETS = [helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, OPSET_VERSION)]
REL_TOL = 1e-5


@pytest.fixture(scope="session", autouse=True)
def kernel_library():
    """The library under test: built (incrementally) from kernels/ unless $RESPIN_OPS_LIBRARY names one."""
    if not os.environ.get(ENV_VAR):
        build()
    return library_path()


def _info(name: str, value) -> onnx.ValueInfoProto:
    """A value info with the dtype of `value` (an array, or a dtype for an unknown shape); every
    dimension symbolic, so that shape checks are left to the kernels."""
    if isinstance(value, np.ndarray):
        dtype, shape = value.dtype, [f"{name}_{i}" for i in range(value.ndim)]
    else:
        dtype, shape = np.dtype(value), None
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(dtype), shape)


def one_node_model(op: str, inputs: dict, outputs: dict, functions=(), overload: str = "", **attrs) -> bytes:
    """A model of one `respin` node; `inputs` maps names to arrays ("" for an absent optional input),
    `outputs` maps names to numpy dtypes."""
    present = {name: value for name, value in inputs.items() if isinstance(value, np.ndarray)}
    node = helper.make_node(op, [name if name in present else "" for name in inputs], list(outputs),
                            domain=DOMAIN, overload=overload or None, **attrs)
    graph = helper.make_graph([node], op, [_info(n, v) for n, v in present.items()],
                              [_info(n, dtype) for n, dtype in outputs.items()])
    model = helper.make_model(graph, opset_imports=OPSETS, functions=list(functions), ir_version=10)
    return model.SerializeToString()


def run(model: bytes, feeds: dict, use_kernels: bool = True, threads: int | None = None) -> list[np.ndarray]:
    session = ort.InferenceSession(model, session_options(use_kernels, threads), providers=["CPUExecutionProvider"])
    return session.run(None, {name: value for name, value in feeds.items() if isinstance(value, np.ndarray)})


def run_op(op: str, inputs: dict, outputs: dict, threads: int | None = None, **attrs) -> list[np.ndarray]:
    return run(one_node_model(op, inputs, outputs, **attrs), inputs, threads=threads)


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-30)
    err = float(np.abs(actual.astype(np.float64) - expected).max(initial=0.0))
    assert err / scale <= REL_TOL, f"max |err| {err:.3g} vs max |ref| {scale:.3g}"


def assert_exact(actual: list[np.ndarray], expected: tuple) -> None:
    for a, e in zip(actual, expected, strict=True):
        assert a.dtype == e.dtype and a.shape == e.shape
        np.testing.assert_array_equal(a, e)


def rng(*key) -> np.random.Generator:
    """A generator seeded by the test's parameters (stable across runs, unlike hash())."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


# ------------------------------------------------------------------------------------ Hadamard


@pytest.mark.parametrize("n", [8, 12, 20, 36, 64, 96, 576, 1536])
@pytest.mark.parametrize("lead", [(3,), (2, 5), (1, 2, 3)])
def test_hadamard_matches_reference(n, lead):
    m = hadamard_factorization(n)[1]
    x = rng("hadamard", n, lead).standard_normal((*lead, n)).astype(np.float32)
    (y,) = run_op("Hadamard", {"X": x}, {"Y": np.float32}, n=n, m=m)
    assert_close(y, reference.hadamard(x, n, m))


CORE_SIZES = [m for m in range(1, 253) if hadamard_factorization(m) == (1, m)]


@pytest.mark.parametrize("n", CORE_SIZES + [2 * 28, 4 * 52, 8 * 20])
def test_hadamard_builds_the_python_matrix(n):
    """Every core H_m up to 252 (Paley I/II, prime and prime-power q: 28, 52, 244, ...) entry for entry."""
    _, m = hadamard_factorization(n)
    (y,) = run_op("Hadamard", {"X": np.eye(n, dtype=np.float32)}, {"Y": np.float32}, n=n, m=m)
    np.testing.assert_array_equal(np.rint(y.astype(np.float64) * math.sqrt(n)), hadamard_matrix(n).numpy())


def test_hadamard_empty_rows():
    x = np.zeros((2, 0, 12), np.float32)
    (y,) = run_op("Hadamard", {"X": x}, {"Y": np.float32}, n=12, m=12)
    assert y.shape == (2, 0, 12)


# ----------------------------------------------------------------------------- DynamicQuantize


def quantize_inputs(shape: tuple[int, ...], key) -> np.ndarray:
    """Gaussian rows with outliers, an all-zero row, a constant row and a row of exact ties."""
    x = rng("quantize", shape, key).standard_normal(shape).astype(np.float32)
    x.reshape(-1, shape[-1])[:, :: max(1, shape[-1] // 3)] *= 20.0
    rows = x.reshape(-1, shape[-1])
    if rows.shape[0] >= 3:
        rows[0] = 0.0
        rows[1] = -3.25
        rows[2] = (np.arange(shape[-1]) % 31 - 15) * 0.5  # x/scale hits .5 for several grids
    return x


@pytest.mark.parametrize("bits", [4, 8, 3])
@pytest.mark.parametrize("symmetric", [0, 1])
@pytest.mark.parametrize("clip", [1.0, 0.9])
@pytest.mark.parametrize("shape", [(5, 37), (2, 3, 64), (1, 1), (4, 31)])
def test_dynamic_quantize_bit_exact(bits, symmetric, clip, shape):
    x = quantize_inputs(shape, (bits, symmetric, clip))
    out = run_op("DynamicQuantize", {"X": x}, {"Xq": np.int8, "scale": np.float32, "zero_point": np.int8},
                 bits=bits, symmetric=symmetric, clip=clip)
    assert_exact(out, reference.dynamic_quantize(x, bits=bits, symmetric=symmetric, clip=clip))


def test_dynamic_quantize_rounds_half_to_even():
    x = np.array([[0.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 127.0]], np.float32)  # symmetric 8-bit: scale 1
    q, scale, _ = run_op("DynamicQuantize", {"X": x}, {"Xq": np.int8, "scale": np.float32, "zero_point": np.int8},
                         bits=8, symmetric=1, clip=1.0)
    assert scale[0, 0] == 1.0
    np.testing.assert_array_equal(q, [[0, 0, 2, 2, 0, -2, -2, 127]])


# ------------------------------------------------------------------------ QuantizeKV / DequantizeKV


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(1, 3, 5, 64), (2, 1, 4, 37), (1, 2, 1, 1)])
def test_quantize_kv_bit_exact(bits, shape):
    x = quantize_inputs(shape, ("kv", bits))
    codes = np.uint8 if bits == 4 else np.int8
    out = run_op("QuantizeKV", {"X": x}, {"Xq": codes, "scale": np.float32, "zero_point": np.int8}, bits=bits)
    assert_exact(out, reference.quantize_kv(x, bits=bits))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("head_dim", [64, 37, 1])
def test_dequantize_kv_bit_exact(bits, head_dim):
    r = rng("dequantize", bits, head_dim)
    half = 2 ** (bits - 1)
    q = r.integers(-half, half, (2, 3, 5, head_dim), dtype=np.int8)
    xq = reference.pack_int4(q) if bits == 4 else q
    scale = r.uniform(1e-3, 2.0, (2, 3, 5, 1)).astype(np.float32)
    zp = r.integers(-half, half, (2, 3, 5, 1), dtype=np.int8)
    (y,) = run_op("DequantizeKV", {"Xq": xq, "scale": scale, "zero_point": zp}, {"Y": np.float32},
                  bits=bits, head_dim=head_dim)
    assert_exact([y], (reference.dequantize_kv(xq, scale, zp, bits=bits, head_dim=head_dim),))


# ------------------------------------------------------------------------------------- QMatMul


def qmatmul_inputs(lead: tuple[int, ...], K: int, N: int, bits: int, group_size: int, bias: bool) -> dict:
    """Random QMatMul inputs: activation codes over the whole int8 range, weight codes of `bits`."""
    r = rng("qmatmul", lead, K, N, bits, group_size, bias)
    half = 2 ** (bits - 1)
    groups = -(-K // group_size) if group_size else 1
    wq = r.integers(-half, half, (N, K), dtype=np.int8)
    return {
        "Xq": r.integers(-128, 128, (*lead, K), dtype=np.int8),
        "x_scale": r.uniform(1e-3, 0.1, (*lead, 1)).astype(np.float32),
        "x_zero_point": r.integers(-128, 128, (*lead, 1), dtype=np.int8),
        "W": reference.pack_int4(wq) if bits == 4 else wq,
        "w_scale": r.uniform(1e-3, 0.1, (N, groups)).astype(np.float32),
        "w_zero_point": r.integers(-half, half, (N, groups), dtype=np.int8),
        "bias": r.standard_normal(N).astype(np.float32) if bias else "",
    }


def qmatmul_reference(inputs: dict, K: int, bits: int, group_size: int) -> np.ndarray:
    args = [inputs[name] for name in ("Xq", "x_scale", "x_zero_point", "W", "w_scale", "w_zero_point")]
    bias = inputs["bias"] if isinstance(inputs["bias"], np.ndarray) else None
    return reference.qmatmul(*args, bias=bias, K=K, bits=bits, group_size=group_size)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [0, 32, 16])
@pytest.mark.parametrize("K", [37, 96, 100, 1536])
@pytest.mark.parametrize("lead", [(1,), (2, 32)])
@pytest.mark.parametrize("bias", [True, False])
def test_qmatmul_matches_reference(bits, group_size, K, lead, bias):
    inputs = qmatmul_inputs(lead, K, 37 if K < 1536 else 70, bits, group_size, bias)
    (y,) = run_op("QMatMul", inputs, {"Y": np.float32}, K=K, bits=bits, group_size=group_size)
    assert_close(y, qmatmul_reference(inputs, K, bits, group_size))


@pytest.mark.parametrize("group_size, K", [(10, 96), (6, 37), (1, 9)])
@pytest.mark.parametrize("lead", [(1,), (2, 7)])
def test_qmatmul_odd_group_sizes(group_size, K, lead):
    """Groups that are not a multiple of 4 columns (the VNNI path's layout) take the int16 path."""
    inputs = qmatmul_inputs(lead, K, 21, 4, group_size, True)
    (y,) = run_op("QMatMul", inputs, {"Y": np.float32}, K=K, bits=4, group_size=group_size)
    np.testing.assert_array_equal(y, qmatmul_reference(inputs, K, 4, group_size))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("M", [1, 7, 130])
def test_qmatmul_large_is_bit_exact(threads, M):
    """Integer sums are exact and the float64 combination follows the reference's order."""
    inputs = qmatmul_inputs((M,), 576, 1536, 4, 0, True)
    (y,) = run_op("QMatMul", inputs, {"Y": np.float32}, threads=threads, K=576, bits=4, group_size=0)
    np.testing.assert_array_equal(y, qmatmul_reference(inputs, 576, 4, 0))


@pytest.mark.parametrize("bits, group_size, K", [(4, 0, 576), (4, 32, 100), (8, 16, 37), (8, 0, 96)])
@pytest.mark.parametrize("lead", [(1,), (3, 5)])
def test_qmatmul_with_constant_weights(bits, group_size, K, lead):
    """Weights as initializers, the way models store them (their sums are precomputed at session creation)."""
    inputs = qmatmul_inputs(lead, K, 45, bits, group_size, True)
    constants = ("W", "w_scale", "w_zero_point", "bias")
    feeds = {n: v for n, v in inputs.items() if n not in constants}
    node = helper.make_node("QMatMul", list(inputs), ["Y"], domain=DOMAIN, K=K, bits=bits, group_size=group_size)
    graph = helper.make_graph([node], "qmatmul", [_info(n, v) for n, v in feeds.items()], [_info("Y", np.float32)],
                              [numpy_helper.from_array(inputs[n], n) for n in constants])
    model = helper.make_model(graph, opset_imports=OPSETS, ir_version=10).SerializeToString()
    (y,) = run(model, feeds)
    np.testing.assert_array_equal(y, qmatmul_reference(inputs, K, bits, group_size))


def test_qmatmul_int16_layout(kernel_library):
    """CPUs without AVX512-VNNI run the int16 layout; RESPIN_OPS_NO_VNNI=1 forces it on this one too."""
    code = ("import test_kernels as t\n"
            "for bits, gs, K, lead in [(4, 0, 37, (1,)), (4, 32, 1536, (2, 32)), (8, 16, 100, (2, 32)), (8, 0, 96, (1,))]:\n"
            "    t.test_qmatmul_matches_reference(bits, gs, K, lead, True)\n"
            "t.test_qmatmul_large_is_bit_exact(2, 130)\n"
            "t.test_qmatmul_with_constant_weights(4, 32, 100, (3, 5))\n")
    env = {**os.environ, "RESPIN_OPS_NO_VNNI": "1", ENV_VAR: str(kernel_library),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, env=env, check=True)


# -------------------------------------------------------------------------- ResidualCorrection


@pytest.mark.parametrize("D", [24, 576])
@pytest.mark.parametrize("r", [1, 5, "D"])
@pytest.mark.parametrize("lead", [(3,), (2, 3)])
def test_residual_correction_matches_reference(D, r, lead):
    r = D if r == "D" else r
    g = rng("residual", D, r, lead)
    x = g.standard_normal((*lead, D)).astype(np.float32)
    Q = np.linalg.qr(g.standard_normal((D, r)))[0].astype(np.float32)
    M = (0.1 * g.standard_normal((r, r))).astype(np.float32)
    (y,) = run_op("ResidualCorrection", {"X": x, "Q": Q, "M": M}, {"Y": np.float32})
    assert_close(y, reference.residual_correction(x, Q, M))


# ---------------------------------------------------------------------------------- bad input


def assert_fails(model: bytes, feeds: dict, *fragments: str) -> None:
    """Session creation or run raises an onnxruntime error whose message holds every fragment."""
    with pytest.raises(Exception) as info:
        run(model, feeds)
    assert not isinstance(info.value, (AssertionError, TypeError, KeyError)), info.value
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_bad_last_axis_is_an_error():
    x = np.zeros((2, 32), np.float32)
    assert_fails(one_node_model("Hadamard", {"X": x}, {"Y": np.float32}, n=64, m=1), {"X": x},
                 "respin::Hadamard", "last axis 32", "n = 64")
    assert_fails(one_node_model("QMatMul", qmatmul_inputs((1,), 96, 8, 4, 0, False), {"Y": np.float32}, K=100),
                 qmatmul_inputs((1,), 96, 8, 4, 0, False), "respin::QMatMul", "attribute K = 100")
    q = np.zeros((1, 2, 3, 32), np.uint8)
    s, z = np.ones((1, 2, 3, 1), np.float32), np.zeros((1, 2, 3, 1), np.int8)
    feeds = {"Xq": q, "scale": s, "zero_point": z}
    assert_fails(one_node_model("DequantizeKV", feeds, {"Y": np.float32}, bits=4, head_dim=66), feeds,
                 "respin::DequantizeKV", "last axis 32")


@pytest.mark.parametrize("n, m, message", [(14, 1, "no Hadamard construction of size n = 14"),
                                           (96, 24, "m = 24 does not match n = 96"),
                                           (10, 1, "no Hadamard construction")])
def test_unsupported_hadamard_size_is_an_error(n, m, message):
    x = np.zeros((1, n), np.float32)
    assert_fails(one_node_model("Hadamard", {"X": x}, {"Y": np.float32}, n=n, m=m), {"X": x}, message)


def test_unsupported_bits_is_an_error():
    x = np.zeros((1, 8), np.float32)
    model = one_node_model("QuantizeKV", {"X": x}, {"Xq": np.int8, "scale": np.float32, "zero_point": np.int8},
                           bits=9)
    assert_fails(model, {"X": x}, "respin::QuantizeKV", "bits must be in [2, 8]")


def test_wrong_dtypes_are_errors():
    x64 = np.zeros((2, 8), np.float64)  # a float64 graph input into a float32 op: onnxruntime refuses it
    assert_fails(one_node_model("Hadamard", {"X": x64}, {"Y": np.float32}, n=8, m=1), {"X": x64}, "Hadamard")
    x = np.zeros((2, 8), np.float32)  # a float64 feed for a float32 input
    with pytest.raises(Exception, match="data type"):
        run(one_node_model("Hadamard", {"X": x}, {"Y": np.float32}, n=8, m=1), {"X": x64})
    inputs = qmatmul_inputs((1,), 96, 8, 4, 0, False)
    inputs["W"] = inputs["W"].astype(np.int32)  # W accepts uint8 or int8, checked by the kernel
    assert_fails(one_node_model("QMatMul", inputs, {"Y": np.float32}, K=96, bits=4), inputs,
                 "respin::QMatMul", "input W must be uint8, got int32")
    inputs = qmatmul_inputs((1,), 96, 8, 8, 0, False)
    inputs["W"] = inputs["W"].view(np.uint8)
    assert_fails(one_node_model("QMatMul", inputs, {"Y": np.float32}, K=96, bits=8), inputs,
                 "input W must be int8, got uint8")
    outputs = {"Xq": np.int8, "scale": np.float32, "zero_point": np.int8}  # bits = 4 stores uint8
    assert_fails(one_node_model("QuantizeKV", {"X": x}, outputs, bits=4), {"X": x},
                 "does not match expected type (tensor(uint8))")  # caught by onnxruntime's type inference
    node = helper.make_node("QuantizeKV", ["X"], list(outputs), domain=DOMAIN, bits=4)
    graph = helper.make_graph([node], "kv", [_info("X", np.float32)], [_info(n, t) for n, t in outputs.items()])
    model = helper.make_model(graph, opset_imports=OPSETS, ir_version=10).SerializeToString()
    assert_fails(model, {"X": x}, "output Xq is int8 in the model, but bits = 4 stores uint8 codes")  # by the kernel


def test_mismatched_scale_shapes_are_errors():
    inputs = qmatmul_inputs((2, 32), 96, 8, 4, 32, True)
    bad = {**inputs, "w_scale": inputs["w_scale"][:, :2]}
    assert_fails(one_node_model("QMatMul", bad, {"Y": np.float32}, K=96, bits=4, group_size=32), bad,
                 "respin::QMatMul", "w_scale has shape [8, 2], expected [8, 3]")
    bad = {**inputs, "x_scale": inputs["x_scale"][:, :5]}
    assert_fails(one_node_model("QMatMul", bad, {"Y": np.float32}, K=96, bits=4, group_size=32), bad,
                 "x_scale has shape [2, 5, 1], expected [2, 32, 1]")
    bad = {**inputs, "bias": inputs["bias"][:3]}
    assert_fails(one_node_model("QMatMul", bad, {"Y": np.float32}, K=96, bits=4, group_size=32), bad,
                 "bias has shape [3], expected [8]")
    feeds = {"Xq": np.zeros((2, 5, 64), np.int8), "scale": np.ones((2, 4, 1), np.float32),
             "zero_point": np.zeros((2, 5, 1), np.int8)}
    assert_fails(one_node_model("DequantizeKV", feeds, {"Y": np.float32}, bits=8, head_dim=64), feeds,
                 "respin::DequantizeKV", "scale has shape [2, 4, 1], expected [2, 5, 1]")
    feeds = {"X": np.zeros((3, 24), np.float32), "Q": np.zeros((24, 5), np.float32), "M": np.zeros((4, 4), np.float32)}
    assert_fails(one_node_model("ResidualCorrection", feeds, {"Y": np.float32}), feeds,
                 "respin::ResidualCorrection", "M has shape [4, 4], expected [5, 5]")


def test_process_survives_errors_and_keeps_working():
    x = np.zeros((2, 32), np.float32)
    for _ in range(3):
        assert_fails(one_node_model("Hadamard", {"X": x}, {"Y": np.float32}, n=64, m=1), {"X": x}, "last axis")
    (y,) = run_op("Hadamard", {"X": np.ones((1, 8), np.float32)}, {"Y": np.float32}, n=8, m=1)
    assert y[0, 0] == pytest.approx(math.sqrt(8))


# ------------------------------------------------------------- kernels replace function bodies


def doubled_correction_body(overload: str = "") -> onnx.FunctionProto:
    """respin::ResidualCorrection written wrong on purpose: X + 2·((X·Q)·M)·Qᵀ."""
    nodes = [
        helper.make_node("MatMul", ["X", "Q"], ["XQ"]),
        helper.make_node("MatMul", ["XQ", "M"], ["XQM"]),
        helper.make_node("Transpose", ["Q"], ["Qt"], perm=[1, 0]),
        helper.make_node("MatMul", ["XQM", "Qt"], ["C"]),
        helper.make_node("Add", ["C", "C"], ["C2"]),
        helper.make_node("Add", ["X", "C2"], ["Y"]),
    ]
    return helper.make_function(DOMAIN, "ResidualCorrection", ["X", "Q", "M"], ["Y"], nodes,
                                [helper.make_opsetid("", 21)], overload=overload or None)


@pytest.mark.parametrize("overload", ["", "n64"])
def test_library_kernel_replaces_function_body(overload):
    """With the library registered its kernel runs, even for an IR-10 overloaded function; without
    it the model-local body runs."""
    g = rng("function body")
    feeds = {"X": g.standard_normal((3, 64)).astype(np.float32),
             "Q": np.linalg.qr(g.standard_normal((64, 4)))[0].astype(np.float32),
             "M": g.standard_normal((4, 4)).astype(np.float32)}
    model = one_node_model("ResidualCorrection", feeds, {"Y": feeds["X"]},
                           functions=[doubled_correction_body(overload)], overload=overload)
    onnx.checker.check_model(onnx.load_from_string(model), full_check=True)
    x, Q, M = (feeds[k].astype(np.float64) for k in "XQM")
    doubled = (x + 2 * ((x @ Q) @ M) @ Q.T).astype(np.float32)
    (with_kernels,) = run(model, feeds, use_kernels=True)
    (bodies_only,) = run(model, feeds, use_kernels=False)
    assert_close(with_kernels, reference.residual_correction(*feeds.values()))
    assert_close(bodies_only, doubled)


def test_two_overloads_in_one_model():
    """Two Hadamard nodes whose bodies are different overloads (scale by 2 and by 3): the library
    serves both nodes; without it each node gets its own body."""
    def scaled_body(overload: str, factor: float) -> onnx.FunctionProto:
        nodes = [helper.make_node("Constant", [], ["c"], value=helper.make_tensor("c", TensorProto.FLOAT, [], [factor])),
                 helper.make_node("Mul", ["X", "c"], ["Y"])]
        return helper.make_function(DOMAIN, "Hadamard", ["X"], ["Y"], nodes, [helper.make_opsetid("", 21)],
                                    attributes=["n", "m"], overload=overload)

    nodes = [helper.make_node("Hadamard", ["A"], ["YA"], domain=DOMAIN, overload="n8_m1", n=8, m=1),
             helper.make_node("Hadamard", ["B"], ["YB"], domain=DOMAIN, overload="n12_m12", n=12, m=12)]
    a = rng("overloads", 8).standard_normal((2, 8)).astype(np.float32)
    b = rng("overloads", 12).standard_normal((2, 12)).astype(np.float32)
    graph = helper.make_graph(nodes, "two", [_info("A", a), _info("B", b)],
                              [_info("YA", a), _info("YB", b)])
    model = helper.make_model(graph, opset_imports=OPSETS, ir_version=10,
                              functions=[scaled_body("n8_m1", 2.0), scaled_body("n12_m12", 3.0)])
    onnx.checker.check_model(model, full_check=True)
    ya, yb = run(model.SerializeToString(), {"A": a, "B": b}, use_kernels=True)
    assert_close(ya, reference.hadamard(a, 8, 1))
    assert_close(yb, reference.hadamard(b, 12, 12))
    ya, yb = run(model.SerializeToString(), {"A": a, "B": b}, use_kernels=False)
    np.testing.assert_array_equal(ya, 2 * a)
    np.testing.assert_array_equal(yb, 3 * b)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("x_shape", [["b", 2, "s", "d"], [None, 2, None, 8], [1, 2, 3, 8]])
def test_quantize_kv_codes_type_is_inferred(bits, x_shape):
    """Xq's dtype follows `bits`: the kernel tells onnxruntime (uint8 or int8) and its shape, so the
    codes can feed another node (the cache Concat) without a declared type."""
    x = rng("kv concat", bits).standard_normal((1, 2, 3, 8)).astype(np.float32)
    codes = np.uint8 if bits == 4 else np.int8
    past = np.zeros((1, 2, 0, 4 if bits == 4 else 8), codes)
    nodes = [helper.make_node("QuantizeKV", ["X"], ["Xq", "scale", "zp"], domain=DOMAIN, bits=bits),
             helper.make_node("Concat", ["past", "Xq"], ["present"], axis=2)]
    x_info = helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)
    graph = helper.make_graph(nodes, "kv", [x_info, _info("past", past)],
                              [_info("present", codes), _info("scale", np.float32), _info("zp", np.int8)])
    model = helper.make_model(graph, opset_imports=OPSETS, ir_version=10)
    present, scale, zp = run(model.SerializeToString(), {"X": x, "past": past})
    assert_exact([present, scale, zp], reference.quantize_kv(x, bits=bits))


def test_quantize_kv_of_unknown_rank_needs_a_declared_type():
    """With no shape for X the kernel says nothing (a rank-0 guess would be wrong); a value_info for
    Xq then gives onnxruntime its type."""
    x = rng("kv concat").standard_normal((1, 2, 3, 8)).astype(np.float32)
    past = np.zeros((1, 2, 0, 4), np.uint8)
    nodes = [helper.make_node("QuantizeKV", ["X"], ["Xq", "scale", "zp"], domain=DOMAIN, bits=4),
             helper.make_node("Concat", ["past", "Xq"], ["present"], axis=2)]
    graph = helper.make_graph(nodes, "kv", [_info("X", np.float32), _info("past", past)],
                              [_info("present", np.uint8), _info("scale", np.float32), _info("zp", np.int8)])
    model = helper.make_model(graph, opset_imports=OPSETS, ir_version=10)
    assert_fails(model.SerializeToString(), {"X": x, "past": past}, "type inference failed")
    model.graph.value_info.append(helper.make_tensor_value_info("Xq", TensorProto.UINT8, None))
    present, scale, zp = run(model.SerializeToString(), {"X": x, "past": past})
    assert_exact([present, scale, zp], reference.quantize_kv(x, bits=4))


def _exported_node_cases():
    g = rng("exported bodies")
    x = g.standard_normal((2, 3, 96)).astype(np.float32)
    kv = g.standard_normal((1, 2, 5, 37)).astype(np.float32)
    q4, s4, z4 = reference.quantize_kv(kv, bits=4)
    q8, s8, z8 = reference.quantize_kv(kv, bits=8)
    Q = np.linalg.qr(g.standard_normal((96, 6)))[0].astype(np.float32)
    M = g.standard_normal((6, 6)).astype(np.float32)
    qmm_g = qmatmul_inputs((2, 5), 100, 24, 4, 32, True)
    qmm_c = {**qmatmul_inputs((3,), 96, 24, 8, 0, False), "bias": ""}
    return [
        ("Hadamard", {"X": x}, {"Y": np.float32}, {"n": 96, "m": 12}, (reference.hadamard(x, 96, 12),)),
        ("DynamicQuantize", {"X": x}, {"Xq": np.int8, "scale": np.float32, "zero_point": np.int8},
         {"bits": 4, "symmetric": 0, "clip": 0.9}, reference.dynamic_quantize(x, 4, 0, 0.9)),
        ("QMatMul", qmm_g, {"Y": np.float32}, {"K": 100, "bits": 4, "group_size": 32},
         (qmatmul_reference(qmm_g, 100, 4, 32),)),
        ("QMatMul", qmm_c, {"Y": np.float32}, {"K": 96, "bits": 8, "group_size": 0},
         (qmatmul_reference(qmm_c, 96, 8, 0),)),
        ("ResidualCorrection", {"X": x, "Q": Q, "M": M}, {"Y": np.float32}, {},
         (reference.residual_correction(x, Q, M),)),
        ("QuantizeKV", {"X": kv}, {"Xq": np.uint8, "scale": np.float32, "zero_point": np.int8}, {"bits": 4},
         (q4, s4, z4)),
        ("QuantizeKV", {"X": kv}, {"Xq": np.int8, "scale": np.float32, "zero_point": np.int8}, {"bits": 8},
         (q8, s8, z8)),
        ("DequantizeKV", {"Xq": q4, "scale": s4, "zero_point": z4}, {"Y": np.float32}, {"bits": 4, "head_dim": 37},
         (reference.dequantize_kv(q4, s4, z4, 4, 37),)),
        ("DequantizeKV", {"Xq": q8, "scale": s8, "zero_point": z8}, {"Y": np.float32}, {"bits": 8, "head_dim": 37},
         (reference.dequantize_kv(q8, s8, z8, 8, 37),)),
    ]


@pytest.mark.parametrize("case", _exported_node_cases(), ids=lambda case: f"{case[0]}-{case[3]}")
def test_kernels_replace_the_exporters_overloaded_bodies(case):
    """Nodes and bodies as the exporter makes them (`runtime_ops.functions`: one overload per
    variant): the library's kernels and the bodies alone both give the reference's result."""
    from runtime_ops import functions

    op, inputs, outputs, attrs, expected = case
    present = {n: v for n, v in inputs.items() if isinstance(v, np.ndarray)}
    node = functions.make_node(op, [n if n in present else "" for n in inputs], list(outputs), name=op, **attrs)
    graph = helper.make_graph([node], op, [_info(n, v) for n, v in present.items()],
                              [_info(n, t) for n, t in outputs.items()])
    model = helper.make_model(graph, opset_imports=functions.opset_imports(), ir_version=10,
                              functions=functions.function_protos([node])).SerializeToString()
    exact = op in ("DynamicQuantize", "QuantizeKV", "DequantizeKV")
    for use_kernels in (True, False):
        got = run(model, present, use_kernels=use_kernels)
        if exact:
            assert_exact(got, expected)
        else:
            assert_close(got[0], expected[0])


# --------------------------------------------------------------- fused forms (R4, R3 on K, residual add)

QUANT_OUTPUTS = {"Xq": np.int8, "scale": np.float32, "zero_point": np.int8}


@pytest.mark.parametrize("n,bits,symmetric", [(64, 4, 0), (576, 4, 0), (1536, 8, 1), (12, 4, 0)])
def test_fused_hadamard_dynamic_quantize_is_the_two_kernels(n, bits, symmetric):
    x = quantize_inputs((3, 5, n), ("fused", n))
    m = hadamard_factorization(n)[1]
    (rotated,) = run_op("Hadamard", {"X": x}, {"Y": np.float32}, n=n, m=m)
    expected = run_op("DynamicQuantize", {"X": rotated}, QUANT_OUTPUTS, bits=bits, symmetric=symmetric)
    fused = run_op("DynamicQuantize", {"X": x}, QUANT_OUTPUTS, bits=bits, symmetric=symmetric, hadamard=n, hadamard_m=m)
    assert_exact(fused, tuple(expected))


@pytest.mark.parametrize("bits", [4, 8])
def test_fused_hadamard_quantize_kv_is_the_two_kernels(bits):
    x = quantize_inputs((2, 3, 7, 64), ("fused kv", bits))
    codes = {"Xq": np.uint8 if bits == 4 else np.int8, "scale": np.float32, "zero_point": np.int8}
    (rotated,) = run_op("Hadamard", {"X": x}, {"Y": np.float32}, n=64, m=1)
    expected = run_op("QuantizeKV", {"X": rotated}, codes, bits=bits)
    assert_exact(run_op("QuantizeKV", {"X": x}, codes, bits=bits, hadamard=64, hadamard_m=1), tuple(expected))


def test_residual_correction_adds_z_last():
    g = rng("residual z")
    x, z = (g.standard_normal((2, 5, 96)).astype(np.float32) for _ in range(2))
    Q = np.linalg.qr(g.standard_normal((96, 8)))[0].astype(np.float32)
    M = g.standard_normal((8, 8)).astype(np.float32)
    (plain,) = run_op("ResidualCorrection", {"X": x, "Q": Q, "M": M}, {"Y": np.float32})
    (fused,) = run_op("ResidualCorrection", {"X": x, "Q": Q, "M": M, "Z": z}, {"Y": np.float32})
    np.testing.assert_array_equal(fused, plain + z)


def test_fused_forms_check_their_inputs():
    x = np.ones((2, 64), np.float32)
    with pytest.raises(Exception, match="attribute hadamard = 128 transforms rows of that size"):
        run_op("DynamicQuantize", {"X": x}, QUANT_OUTPUTS, hadamard=128, hadamard_m=1)
    with pytest.raises(Exception, match="no Hadamard construction of that size"):
        run_op("QuantizeKV", {"X": np.ones((2, 86), np.float32)}, {"Xq": np.uint8, "scale": np.float32,
                                                                    "zero_point": np.int8}, hadamard=86)
    Q, M = np.ones((64, 2), np.float32), np.ones((2, 2), np.float32)
    with pytest.raises(Exception, match="input Z has shape"):
        run_op("ResidualCorrection", {"X": x, "Q": Q, "M": M, "Z": np.ones((3, 64), np.float32)}, {"Y": np.float32})


# ------------------------------------------------------------- the online-op benchmarks' models and stats
def _benchmark(name: str):
    """benchmarks/<name>.py as a module (registered in sys.modules: its dataclasses need that)."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules.setdefault(name, importlib.util.module_from_spec(spec))
    spec.loader.exec_module(module)
    return module


def test_online_ops_benchmark_models_run_with_the_kernels():
    """Every case of benchmarks/online_ops.py: the op's chain and its baseline's run on our kernels."""
    bench = _benchmark("online_ops")
    rng = np.random.default_rng(0)
    for case in bench.cases():
        for with_op in (True, False):
            model = bench.build(case, with_op, False, rng)
            session = ort.InferenceSession(model, session_options(True, 1))
            feeds = {"x": rng.standard_normal(case.shape).astype(np.float32),
                     "z": rng.standard_normal(case.shape).astype(np.float32)}
            outputs = session.run(None, {a.name: feeds[a.name] for a in session.get_inputs()})
            assert all(np.all(np.isfinite(o)) for o in outputs), case.name
            ops = {n.op_type for n in onnx.load_from_string(model).graph.node}
            assert (case.op in ops) == (with_op or case.baseline == "plain"), case.name


def test_overhead_interval_brackets_the_median_and_is_reproducible():
    bench = _benchmark("onnx_runtime")
    ratios = np.random.default_rng(3).normal(1.05, 0.12, 128)
    low, high = bench.median_ci95(ratios)
    assert low < np.median(ratios) < high and high - low < 0.1
    assert bench.median_ci95(ratios) == (low, high)
