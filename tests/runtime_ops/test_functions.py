"""The ONNX function bodies of the `respin` ops pass the ONNX checker and strict shape inference and,
run by a stock onnxruntime, agree with the NumPy references (bit-exact where the reference is)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from rotations.hadamard import hadamard_factorization
from runtime_ops import functions as fn
from runtime_ops import reference as ref

RNG = np.random.default_rng(0)


def _run(nodes: list[onnx.NodeProto], feeds: dict[str, np.ndarray], outputs: list[str],
         ranks: list[int]) -> list[np.ndarray]:
    """One model of `nodes` (+ their functions): checked, shape-inferred (ranks of `outputs`), run."""
    def info(name, array, symbolic):
        shape = [f"{name}{i}" if symbolic and i < array.ndim - 1 else d for i, d in enumerate(array.shape)]
        return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype), shape)

    first = [n.input[0] for n in nodes]  # activations get symbolic leading dims
    graph_inputs = [info(name, a, name in first) for name, a in feeds.items()]
    idents = [helper.make_node("Identity", [o], [f"{o}_out"]) for o in outputs]
    # graph outputs: declared with their rank only (symbolic dims), element type from the inference below
    model = helper.make_model(helper.make_graph(nodes + idents, "g", graph_inputs, []),
                              opset_imports=fn.opset_imports(), functions=fn.function_protos(nodes), ir_version=10)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    types = {v.name: v.type.tensor_type for v in inferred.graph.value_info}
    for o, rank in zip(outputs, ranks):
        assert types[o].HasField("shape") and len(types[o].shape.dim) == rank, (o, types.get(o))
        model.graph.output.append(helper.make_tensor_value_info(f"{o}_out", types[o].elem_type,
                                                                [f"{o}{i}" for i in range(rank)]))
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, strict_mode=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([f"{o}_out" for o in outputs], feeds)


def _rel_err(y: np.ndarray, expected: np.ndarray) -> float:
    assert y.shape == expected.shape and y.dtype == expected.dtype
    return float(np.abs(y.astype(np.float64) - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize("n", [1, 8, 12, 20, 36, 64, 96, 576, 1536, 4096])
@pytest.mark.parametrize("lead", [(3, 5), (2, 3, 4)])
def test_hadamard_matches_the_reference(n, lead):
    m = hadamard_factorization(n)[1]
    x = RNG.standard_normal((*lead, n)).astype(np.float32)
    node = fn.make_node("Hadamard", ["X"], ["Y"], n=n, m=m)
    assert node.overload == f"n{n}_m{m}"
    (y,) = _run([node], {"X": x}, ["Y"], [x.ndim])
    assert _rel_err(y, ref.hadamard(x, n, m)) <= 1e-5


def test_hadamard_constants_stay_small():
    for n in (1536, 4096, 8192):
        (body,) = fn.function_protos([fn.make_node("Hadamard", ["X"], ["Y"], n=n, m=hadamard_factorization(n)[1])])
        sizes = [np.prod(a.t.dims) for node in body.node for a in node.attribute if a.name == "value"]
        assert max(sizes) <= fn.MAX_SYLVESTER_FACTOR ** 2


def test_two_hadamard_sizes_in_one_model_get_their_own_overloads():
    x = RNG.standard_normal((2, 7, 64)).astype(np.float32)
    z = RNG.standard_normal((2, 7, 1536)).astype(np.float32)
    nodes = [fn.make_node("Hadamard", ["X"], ["Y"], n=64), fn.make_node("Hadamard", ["Z"], ["W"], n=1536, m=12),
             fn.make_node("Hadamard", ["Y"], ["Y2"], n=64)]
    assert [f.overload for f in fn.function_protos(nodes)] == ["n64_m1", "n1536_m12"]
    y, w, y2 = _run(nodes, {"X": x, "Z": z}, ["Y", "W", "Y2"], [3, 3, 3])
    assert _rel_err(y, ref.hadamard(x, 64)) <= 1e-5 and _rel_err(w, ref.hadamard(z, 1536, 12)) <= 1e-5
    np.testing.assert_allclose(y2, x, rtol=0, atol=1e-5)  # H_64/8 is symmetric and orthogonal


def _activations(shape: tuple[int, ...]) -> np.ndarray:
    x = (RNG.standard_normal(shape) * RNG.uniform(0.01, 30, (*shape[:-1], 1))).astype(np.float32)
    x[0, 0] = 0.0  # an all-zero token
    x[0, 1] = np.abs(x[0, 1])  # all positive: the range still holds 0
    x[1, 0] = -np.abs(x[1, 0])  # all negative
    return x


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("symmetric", [0, 1])
@pytest.mark.parametrize("clip", [1.0, 0.9])
@pytest.mark.parametrize("shape", [(2, 5, 96), (3, 2, 4, 37)])
def test_dynamic_quantize_is_bit_exact(bits, symmetric, clip, shape):
    x = _activations(shape)
    node = fn.make_node("DynamicQuantize", ["X"], ["Xq", "scale", "zero_point"], bits=bits, symmetric=symmetric,
                        clip=clip)
    got = _run([node], {"X": x}, ["Xq", "scale", "zero_point"], [x.ndim] * 3)
    for g, e in zip(got, ref.dynamic_quantize(x, bits=bits, symmetric=symmetric, clip=clip)):
        assert g.dtype == e.dtype
        np.testing.assert_array_equal(g, e)


def _near_ties(bits: int, symmetric: int, K: int) -> np.ndarray:
    """A row [K] with min −1.3 and max 2.1 whose other values sit a few ulps off a .5 tie of X/scale,
    where X/scale and X·(1/scale) round differently (a body must divide, like the reference)."""
    ends = np.array([-1.3, 2.1], np.float32)
    scale = ref.dynamic_quantize(ends, bits, symmetric)[1][0]
    near = [np.float32(t + d * np.spacing(t)) for t in ((np.arange(-2 ** bits, 2 ** bits) + 0.5) * scale)
            for d in range(-8, 9)]
    near = [x for x in near if ends[0] < x < ends[1] and np.round(x / scale) != np.round(x * (np.float32(1) / scale))]
    assert near
    return np.resize(np.concatenate([ends, near]).astype(np.float32), K)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [0, 1])
def test_dynamic_quantize_is_bit_exact_on_ties_and_near_ties(bits, symmetric):
    x = (RNG.standard_normal((64, 256)) * RNG.uniform(0.01, 30, (64, 1))).astype(np.float32)
    half, step = 2 ** (bits - 1), np.float32(0.125)
    x[0] = (np.arange(256) % (2 * half - 1) - half + 0.5).astype(np.float32) * step  # X/scale = j + 0.5
    x[0, :2] = -half * step, (half - 1) * step  # lo, hi: scale = step exactly (asymmetric)
    x[1] = _near_ties(bits, symmetric, 256)
    node = fn.make_node("DynamicQuantize", ["X"], ["Xq", "scale", "zero_point"], bits=bits, symmetric=symmetric)
    got = _run([node], {"X": x}, ["Xq", "scale", "zero_point"], [2] * 3)
    for g, e in zip(got, ref.dynamic_quantize(x, bits=bits, symmetric=symmetric)):
        np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 37, 1])
def test_kv_quantize_and_dequantize_are_bit_exact(bits, head_dim):
    x = _activations((2, 3, 5, head_dim)) if head_dim > 1 else RNG.standard_normal((2, 3, 5, 1)).astype(np.float32)
    nodes = [fn.make_node("QuantizeKV", ["X"], ["Xq", "scale", "zero_point"], bits=bits),
             fn.make_node("DequantizeKV", ["Xq", "scale", "zero_point"], ["Y"], bits=bits, head_dim=head_dim)]
    xq, scale, zp, y = _run(nodes, {"X": x}, ["Xq", "scale", "zero_point", "Y"], [4] * 4)
    expected = ref.quantize_kv(x, bits)
    for g, e in zip((xq, scale, zp), expected):
        assert g.dtype == e.dtype
        np.testing.assert_array_equal(g, e)
    assert xq.shape[-1] == ((head_dim + 1) // 2 if bits == 4 else head_dim)
    (y_alone,) = _run([nodes[1]], dict(zip(("Xq", "scale", "zero_point"), expected)), ["Y"], [4])
    for got in (y, y_alone):
        np.testing.assert_array_equal(got, ref.dequantize_kv(*expected, bits=bits, head_dim=head_dim))


@pytest.mark.parametrize("K,group_size", [(96, 0), (96, 32), (100, 32), (37, 0), (37, 16), (1, 0)])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("lead", [(5,), (2, 3)])
def test_qmatmul_matches_the_reference(K, group_size, bits, with_bias, lead):
    N = 11
    xq, xs, xz = ref.dynamic_quantize(RNG.standard_normal((*lead, K)).astype(np.float32), bits=8)
    G = -(-K // (group_size or K))
    half = 2 ** (bits - 1)
    wq = RNG.integers(-half, half, (N, K)).astype(np.int8)
    ws = RNG.uniform(0.01, 0.1, (N, G)).astype(np.float32)
    wz = RNG.integers(-2, 3, (N, G)).astype(np.int8)
    bias = RNG.standard_normal(N).astype(np.float32)
    w = ref.pack_int4(wq) if bits == 4 else wq
    feeds = {"Xq": xq, "x_scale": xs, "x_zero_point": xz, "W": w, "w_scale": ws, "w_zero_point": wz}
    inputs = [*feeds, "bias" if with_bias else ""]
    if with_bias:
        feeds["bias"] = bias
    node = fn.make_node("QMatMul", inputs, ["Y"], K=K, bits=bits, group_size=group_size)
    assert len(node.input) == (7 if with_bias else 6)
    (y,) = _run([node], feeds, ["Y"], [len(lead) + 1])
    expected = ref.qmatmul(xq, xs, xz, w, ws, wz, bias if with_bias else None, K=K, bits=bits, group_size=group_size)
    assert _rel_err(y, expected) <= 1e-5


@pytest.mark.parametrize("r", [1, 5, 24])
def test_residual_correction_matches_the_reference(r):
    D = 24
    Q = np.linalg.qr(RNG.standard_normal((D, r)))[0].astype(np.float32)
    M = RNG.standard_normal((r, r)).astype(np.float32)
    x = RNG.standard_normal((2, 4, D)).astype(np.float32)
    node = fn.make_node("ResidualCorrection", ["X", "Q", "M"], ["Y"])
    (y,) = _run([node], {"X": x, "Q": Q, "M": M}, ["Y"], [3])
    assert _rel_err(y, ref.residual_correction(x, Q, M)) <= 1e-5


def test_one_generic_body_serves_every_dynamic_quantize():
    nodes = [fn.make_node("DynamicQuantize", ["X"], [f"q{b}", f"s{b}", f"z{b}"], bits=b) for b in (4, 8)]
    (body,) = fn.function_protos(nodes + [helper.make_node("Relu", ["X"], ["R"])])
    assert body.overload == "" and not body.attribute  # all have defaults:
    assert {a.name: helper.get_attribute_value(a) for a in body.attribute_proto} == {
        "bits": 8, "symmetric": 0, "clip": 1.0, "hadamard": 0, "hadamard_m": 1}
    x = _activations((2, 3, 40))
    bare = helper.make_node("DynamicQuantize", ["X"], ["Xq", "s", "z"], domain="respin", bits=4)  # not make_node's
    got = _run([bare], {"X": x}, ["Xq", "s", "z"], [3] * 3)
    for g, e in zip(got, ref.dynamic_quantize(x, bits=4)):
        np.testing.assert_array_equal(g, e)
    attrs = {a.name: a for a in nodes[0].attribute}  # defaults filled, clip typed float
    assert {k: helper.get_attribute_value(a) for k, a in attrs.items()} == {
        "bits": 4, "symmetric": 0, "clip": 1.0, "hadamard": 0, "hadamard_m": 1}
    assert attrs["clip"].type == onnx.AttributeProto.FLOAT


def test_make_node_rejects_bad_attributes_and_inputs():
    with pytest.raises(ValueError, match="unknown attribute.*group"):
        fn.make_node("DynamicQuantize", ["X"], ["q", "s", "z"], group=3)
    with pytest.raises(ValueError, match="missing required attribute.*K"):
        fn.make_node("QMatMul", ["a", "b", "c", "d", "e", "f"], ["Y"])
    with pytest.raises(ValueError, match="missing required attribute.*n"):
        fn.make_node("Hadamard", ["X"], ["Y"])
    with pytest.raises(ValueError, match="needs m = 12"):
        fn.make_node("Hadamard", ["X"], ["Y"], n=1536)
    with pytest.raises(ValueError, match="bits"):
        fn.make_node("QuantizeKV", ["X"], ["q", "s", "z"], bits=9)
    with pytest.raises(ValueError, match="unknown respin op"):
        fn.make_node("Softmax", ["X"], ["Y"])
    with pytest.raises(ValueError, match="inputs"):
        fn.make_node("ResidualCorrection", ["X", "Q"], ["Y"])
    with pytest.raises(ValueError, match="outputs"):
        fn.make_node("DynamicQuantize", ["X"], ["q"])
    wrong = helper.make_node("Hadamard", ["X"], ["Y"], domain="respin", n=64, m=1)  # no overload
    with pytest.raises(ValueError, match="overload"):
        fn.function_protos([wrong])
    wrong = helper.make_node("DynamicQuantize", ["X"], ["q", "s", "z"], domain="respin", clip=1)  # int, not float
    with pytest.raises(ValueError, match="clip of the wrong type"):
        fn.function_protos([wrong])
    wrong = helper.make_node("QMatMul", list("abcdef") + [""], ["Y"], domain="respin", K=8, overload="u4")
    with pytest.raises(ValueError, match="empty optional"):
        fn.function_protos([wrong])


def test_empty_sequences_keep_their_shapes():
    # a first decoding step has no past tokens: Reshape's 0 = "copy" and -1 would break the bodies there
    x = np.zeros((1, 0, 96), np.float32)
    kv = np.zeros((1, 2, 0, 37), np.float32)
    nodes = [fn.make_node("Hadamard", ["X"], ["H"], n=96, m=12),
             fn.make_node("DynamicQuantize", ["X"], ["Xq", "xs", "xz"]),
             fn.make_node("QuantizeKV", ["KV"], ["Kq", "ks", "kz"], bits=4),
             fn.make_node("DequantizeKV", ["Kq", "ks", "kz"], ["KVd"], bits=4, head_dim=37)]
    got = _run(nodes, {"X": x, "KV": kv}, ["H", "Xq", "Kq", "KVd"], [3, 3, 4, 4])
    assert [g.shape for g in got] == [(1, 0, 96), (1, 0, 96), (1, 2, 0, 19), (1, 2, 0, 37)]


def _hadamard_body(x: np.ndarray, n: int) -> np.ndarray:
    node = fn.make_node("Hadamard", ["X"], ["Y"], n=n, m=hadamard_factorization(n)[1])
    return _run([node], {"X": x}, ["Y"], [x.ndim])[0]


@pytest.mark.parametrize("n", [64, 96, 1536])
def test_fused_hadamard_dynamic_quantize_is_the_two_bodies(n):
    """DynamicQuantize(hadamard = n) = DynamicQuantize(Hadamard(X)), bit for bit in the bodies."""
    x = _activations((2, 5, n))
    m = hadamard_factorization(n)[1]
    node = fn.make_node("DynamicQuantize", ["X"], ["Xq", "s", "z"], bits=4, hadamard=n, hadamard_m=m)
    assert node.overload == f"h{n}_m{m}"
    got = _run([node], {"X": x}, ["Xq", "s", "z"], [3] * 3)
    plain = fn.make_node("DynamicQuantize", ["Y"], ["Xq", "s", "z"], bits=4)
    expected = _run([plain], {"Y": _hadamard_body(x, n)}, ["Xq", "s", "z"], [3] * 3)
    for a, e in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, e)
    q_ref = ref.dynamic_quantize(x, 4, 0, 1.0, n, m)[0]  # float64 reference transform: codes within ±1
    assert np.abs(got[0].astype(int) - q_ref).max() <= 1


@pytest.mark.parametrize("bits", [4, 8])
def test_fused_hadamard_quantize_kv_is_the_two_bodies(bits):
    x = _activations((2, 3, 64))
    node = fn.make_node("QuantizeKV", ["X"], ["Xq", "s", "z"], bits=bits, hadamard=64, hadamard_m=1)
    assert node.overload == ("u4" if bits == 4 else "i8") + "_h64_m1"
    got = _run([node], {"X": x}, ["Xq", "s", "z"], [3] * 3)
    plain = fn.make_node("QuantizeKV", ["Y"], ["Xq", "s", "z"], bits=bits)
    for a, e in zip(got, _run([plain], {"Y": _hadamard_body(x, 64)}, ["Xq", "s", "z"], [3] * 3), strict=True):
        np.testing.assert_array_equal(a, e)


def test_fused_quantizers_refuse_a_hadamard_without_construction():
    with pytest.raises(ValueError, match="n = 86 has no construction"):
        fn.make_node("DynamicQuantize", ["X"], ["q", "s", "z"], hadamard=86)
    with pytest.raises(ValueError, match="needs m = 36"):
        fn.make_node("QuantizeKV", ["X"], ["q", "s", "z"], hadamard=576, hadamard_m=1)


def test_residual_correction_with_addend():
    D, r = 48, 6
    Q = np.linalg.qr(RNG.standard_normal((D, r)))[0].astype(np.float32)
    M = RNG.standard_normal((r, r)).astype(np.float32)
    x, z = (RNG.standard_normal((2, 4, D)).astype(np.float32) for _ in range(2))
    node = fn.make_node("ResidualCorrection", ["X", "Q", "M", "Z"], ["Y"])
    assert node.overload == "addend"
    (y,) = _run([node], {"X": x, "Q": Q, "M": M, "Z": z}, ["Y"], [3])
    (plain,) = _run([fn.make_node("ResidualCorrection", ["X", "Q", "M"], ["Y"])], {"X": x, "Q": Q, "M": M}, ["Y"], [3])
    np.testing.assert_array_equal(y, plain + z)  # the float32 add comes last
    assert _rel_err(y, ref.residual_correction(x, Q, M, z)) <= 1e-5
