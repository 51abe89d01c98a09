"""ONNX function bodies of the `respin` ops: standard opset-21 ops only, so a model using the custom
ops runs on a stock onnxruntime; a registered kernel library replaces the bodies (DESIGN §6).

Bodies follow `runtime_ops.reference` (bit-exact for DynamicQuantize, QuantizeKV and DequantizeKV).
Attributes that only feed values are read inside one generic body through `ref_attr_name`
(DynamicQuantize's bits/symmetric/clip, QuantizeKV's bits, QMatMul's K/group_size, DequantizeKV's
head_dim). Where the body's structure or its tensor types change with the node, each variant is its
own IR-10 function *overload* (`FunctionProto.overload`, matched by `NodeProto.overload`):
Hadamard per (n, m) (its matrices are constants), QMatMul per weight storage × grouping × bias,
QuantizeKV/DequantizeKV per storage (packed uint8 for 4 bits, int8 otherwise). `make_node` sets the
overload; `function_protos` rebuilds each needed body once.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from runtime_ops.reference import SCALE_FLOOR
from runtime_ops.schema import DOMAIN, OPS, OPSET_VERSION, Attribute, OpSchema

ONNX_OPSET = 21
MAX_SYLVESTER_FACTOR = 128  # H_{2^k} is applied as a Kronecker chain of Sylvester blocks this size at most

_ATTR_TYPES = {"int": AttributeProto.INT, "float": AttributeProto.FLOAT}
_RANGES = {"bits": (2, 8), "symmetric": (0, 1), "K": (1, None), "group_size": (0, None), "head_dim": (1, None),
           "hadamard": (0, None), "hadamard_m": (1, None)}


def opset_imports() -> list[onnx.OperatorSetIdProto]:
    """The model's opset imports: ("", 21) and (respin, 1)."""
    return [helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid(DOMAIN, OPSET_VERSION)]


def _schema(op: str) -> OpSchema:
    if op not in OPS:
        raise ValueError(f"unknown {DOMAIN} op '{op}': known are {', '.join(OPS)}")
    return OPS[op]


def _typed(attribute: Attribute, value) -> int | float:
    return float(value) if attribute.type == "float" else operator.index(value)


def _attributes(op: str, attrs: dict) -> dict[str, int | float]:
    """Schema defaults + `attrs`, typed and range-checked; ValueError names unknown/missing ones."""
    sch = _schema(op)
    known = {a.name: a for a in sch.attributes}
    if unknown := sorted(set(attrs) - set(known)):
        raise ValueError(f"{op}: unknown attribute(s) {', '.join(unknown)}; known are {', '.join(known) or 'none'}")
    values = {**sch.defaults(), **attrs}
    if missing := [name for name in known if name not in values]:
        raise ValueError(f"{op}: missing required attribute(s) {', '.join(missing)}")
    out: dict[str, int | float] = {}
    for name, value in values.items():
        try:
            out[name] = _typed(known[name], value)
        except TypeError:
            raise ValueError(f"{op}: attribute {name} must be {known[name].type}, got {value!r}") from None
        lo, hi = _RANGES.get(name, (None, None))
        if (lo is not None and out[name] < lo) or (hi is not None and out[name] > hi):
            raise ValueError(f"{op}: attribute {name} = {value} outside [{lo}, {hi if hi is not None else '∞'}]")
    if op == "DynamicQuantize" and not out["clip"] > 0:
        raise ValueError(f"DynamicQuantize: clip must be > 0, got {out['clip']}")
    if op == "Hadamard":
        _check_hadamard(op, out["n"], out["m"])
    if out.get("hadamard"):  # the fused quantizers
        _check_hadamard(op, out["hadamard"], out["hadamard_m"])
    return out


def _check_hadamard(op: str, n: int, m: int) -> None:
    from rotations.hadamard import hadamard_factorization

    factors = hadamard_factorization(n) if n >= 1 else None
    if factors is None or factors[1] != m:
        hint = f"n = {n} needs m = {factors[1]}" if factors else f"n = {n} has no construction"
        raise ValueError(f"{op}: Hadamard core m = {m} does not match: {hint}")


def _overload(op: str, attrs: dict, has_optional: bool) -> str:
    """Which body a node needs: empty for the generic bodies."""
    storage = "u4" if attrs.get("bits") == 4 else "i8"
    fused = f"h{attrs['hadamard']}_m{attrs['hadamard_m']}" if attrs.get("hadamard") else ""
    if op == "Hadamard":
        return f"n{attrs['n']}_m{attrs['m']}"
    if op == "QMatMul":
        return storage + ("_grouped" if attrs["group_size"] else "") + ("_bias" if has_optional else "")
    if op == "QuantizeKV":
        return storage + (f"_{fused}" if fused else "")
    if op == "DequantizeKV":
        return storage
    if op == "DynamicQuantize":
        return fused
    if op == "ResidualCorrection":
        return "addend" if has_optional else ""
    return ""


def make_node(op: str, inputs: list[str], outputs: list[str], name: str | None = None,
              **attrs) -> onnx.NodeProto:
    """A `respin` node with all schema attributes (defaults filled) and its function overload set.

    Trailing optional inputs may be "" or left out (QMatMul without bias). ValueError for an unknown
    op, unknown or missing attributes, out-of-range values or wrong input/output counts.
    """
    sch = _schema(op)
    values = _attributes(op, attrs)
    inputs, required = list(inputs), len(sch.inputs) - len(sch.optional_inputs)
    while len(inputs) > required and not inputs[-1]:
        inputs.pop()
    if not required <= len(inputs) <= len(sch.inputs) or not all(inputs[:required]):
        raise ValueError(f"{op}: inputs {sch.inputs} ({required} required), got {inputs}")
    if len(outputs) != len(sch.outputs):
        raise ValueError(f"{op}: outputs {sch.outputs}, got {list(outputs)}")
    return helper.make_node(op, inputs, list(outputs), name=name, domain=DOMAIN,
                            overload=_overload(op, values, has_optional=len(inputs) > required), **values)


def function_protos(nodes: Iterable[onnx.NodeProto]) -> list[onnx.FunctionProto]:
    """The distinct function bodies the `respin` nodes among `nodes` need (others are skipped),
    in order of first use, for `ModelProto.functions`. ValueError where a node's overload is not
    the one its attributes and inputs call for (a node not built by `make_node`)."""
    bodies: dict[tuple[str, str], onnx.FunctionProto] = {}
    for node in nodes:
        if node.domain != DOMAIN:
            continue
        sch = _schema(node.op_type)
        attrs = _attributes(node.op_type, {a.name: helper.get_attribute_value(a) for a in node.attribute})
        if wrong := [a.name for a in node.attribute if a.type != _ATTR_TYPES[sch.attribute(a.name).type]]:
            raise ValueError(f"{node.op_type} node '{node.name}': attribute(s) {', '.join(wrong)} of the wrong type")
        required = len(sch.inputs) - len(sch.optional_inputs)
        if not all(node.input[required:]):
            raise ValueError(f"{node.op_type} node '{node.name}': drop the empty optional inputs (use make_node)")
        overload = _overload(node.op_type, attrs, has_optional=len(node.input) > required)
        if node.overload != overload:
            raise ValueError(f"{node.op_type} node '{node.name}': overload '{node.overload}', expected '{overload}'")
        if (node.op_type, overload) not in bodies:
            bodies[node.op_type, overload] = _BUILDERS[node.op_type](attrs, overload, sch)
    return list(bodies.values())


class _Body:
    """Collects the nodes of one function body with fresh local value names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        out = f"t{len(self.nodes)}_{op_type}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def const(self, value, dtype=np.int64) -> str:
        return self.op("Constant", value=numpy_helper.from_array(np.asarray(value, dtype=dtype), "value"))

    def attr(self, name: str, kind: str = "int") -> str:
        """A scalar Constant holding the calling node's attribute `name` (int64 or float32)."""
        out = self.op("Constant")
        ref = self.nodes[-1].attribute.add()
        ref.name, ref.ref_attr_name = f"value_{kind}", name
        ref.type = AttributeProto.INT if kind == "int" else AttributeProto.FLOAT
        return out

    def function(self, sch: OpSchema, overload: str, inputs: list[str], outputs: list[str]) -> onnx.FunctionProto:
        for node, name in zip(self.nodes[-len(outputs):], outputs):
            node.output[0] = name  # the last len(outputs) nodes produce the outputs, in order
        return helper.make_function(DOMAIN, sch.name, inputs, outputs, self.nodes,
                                    [helper.make_opsetid("", ONNX_OPSET)],
                                    attributes=[a.name for a in sch.attributes if a.default is None],
                                    attribute_protos=[helper.make_attribute(a.name, _typed(a, a.default))
                                                      for a in sch.attributes if a.default is not None],
                                    overload=overload or None, doc_string=sch.meaning)


def _quantize(b: _Body, x: str, symmetric: int | None, clip: float | None) -> tuple[str, str, str]:
    """DynamicQuantize in the reference's float32 op order: (codes float32, scale, zero point float32).
    `symmetric`/`clip` None: read from the node's attributes; bits always is."""
    axes, zero = b.const([-1]), b.const(0.0, np.float32)
    lo0 = b.op("Min", b.op("ReduceMin", x, axes, keepdims=1), zero)
    hi0 = b.op("Max", b.op("ReduceMax", x, axes, keepdims=1), zero)
    clip_v = b.attr("clip", "float") if clip is None else (None if clip == 1.0 else b.const(clip, np.float32))
    lo, hi = (lo0, hi0) if clip_v is None else (b.op("Mul", lo0, clip_v), b.op("Mul", hi0, clip_v))
    bits = b.op("Cast", b.attr("bits"), to=TensorProto.UINT64)
    two_b = b.op("Cast", b.op("BitShift", b.const(1, np.uint64), bits, direction="LEFT"), to=TensorProto.FLOAT)
    one, floor = b.const(1.0, np.float32), b.const(SCALE_FLOOR, np.float32)
    half = b.op("Mul", two_b, b.const(0.5, np.float32))  # 2^(b-1), exact
    qmax = b.op("Sub", half, one)
    scale = b.op("Max", b.op("Div", b.op("Sub", hi, lo), b.op("Sub", two_b, one)), floor)
    zp = b.op("Sub", b.op("Round", b.op("Div", b.op("Neg", lo), scale)), half)
    if symmetric != 0:  # max|X| = max(max(max X, 0), −min(min X, 0)) exactly
        absmax = b.op("Max", hi0, b.op("Neg", lo0))
        sym_scale = b.op("Max", b.op("Div", absmax if clip_v is None else b.op("Mul", absmax, clip_v), qmax), floor)
        if symmetric is None:
            flag = b.op("Cast", b.attr("symmetric"), to=TensorProto.BOOL)
            scale, zp = b.op("Where", flag, sym_scale, scale), b.op("Where", flag, zero, zp)
        else:
            scale, zp = sym_scale, zero
    q = b.op("Clip", b.op("Add", b.op("Round", b.op("Div", x, scale)), zp), b.op("Neg", half), qmax)
    return q, scale, zp


def _unpack4(b: _Body, packed: str, length: str) -> str:
    """uint8 [..., P] → nibbles (code + 8) uint8 [..., length], low nibble first."""
    low = b.op("BitwiseAnd", packed, b.const(15, np.uint8))
    high = b.op("BitShift", packed, b.const(4, np.uint8), direction="RIGHT")
    last = b.const([-1])
    pairs = b.op("Concat", b.op("Unsqueeze", low, last), b.op("Unsqueeze", high, last), axis=-1)
    width = b.op("Mul", b.op("Shape", packed, start=-1), b.const([2]))
    flat = b.op("Reshape", pairs, b.op("Concat", b.op("Shape", packed, end=-1), width, axis=0), allowzero=1)
    return b.op("Slice", flat, b.const([0]), b.op("Unsqueeze", length, b.const([0])), last)


def _pack4(b: _Body, nibbles: str) -> str:
    """nibbles uint8 [..., d] → uint8 [..., ⌈d/2⌉]; an odd d is padded with nibble 8 (code 0)."""
    last = b.const([-1])
    odd = b.op("Mod", b.op("Shape", nibbles, start=-1), b.const([2]))
    even = b.op("Pad", nibbles, b.op("Concat", b.const([0]), odd, axis=0), b.const(8, np.uint8), last)
    width = b.op("Div", b.op("Shape", even, start=-1), b.const([2]))
    pairs = b.op("Reshape", even, b.op("Concat", b.op("Shape", nibbles, end=-1), width, b.const([2]), axis=0),
                 allowzero=1)
    low = b.op("Slice", pairs, b.const([0]), b.const([1]), last)
    high = b.op("BitShift", b.op("Slice", pairs, b.const([1]), b.const([2]), last), b.const(4, np.uint8),
                direction="LEFT")
    return b.op("Squeeze", b.op("BitwiseOr", low, high), last)


def _transform(b: _Body, x: str, n: int, m: int) -> str:
    """Y = X·(H_{2^k} ⊗ H_m)/√n on [..., n]: X viewed row-major as [R, 2^k, m], H_m from the right,
    H_{2^k} from the left (symmetric: x·(A⊗B) = Aᵀ·X·B), H_{2^k} itself as a chain of Sylvester blocks
    ≤ MAX_SYLVESTER_FACTOR (H_{2^a} ⊗ H_{2^c} = H_{2^(a+c)}), so no constant is ever n × n."""
    from rotations.hadamard import _core_hadamard, _sylvester

    k = int(math.log2(n // m))
    parts = -(-k // int(math.log2(MAX_SYLVESTER_FACTOR))) if k else 0
    factors = [2 ** (k * (i + 1) // parts - k * i // parts) for i in range(parts)] + ([m] if m > 1 else [])
    y, mats, lead = x, {}, b.op("Shape", x, end=-1)  # explicit shapes (allowzero): leading dims may be 0
    for i, f in enumerate(factors):
        key = (f, i == len(factors) - 1 and m > 1)  # (size, is the core)
        if key not in mats:
            mats[key] = b.const((_core_hadamard(f) if key[1] else _sylvester(f)).numpy(), np.float32)
        dims = [math.prod(factors[:i]), f, n // math.prod(factors[:i + 1])]
        if i == len(factors) - 1:  # the innermost factor: last axis [..., n/f, f], from the right
            y = b.op("MatMul", b.op("Reshape", y, b.op("Concat", lead, b.const([n // f, f]), axis=0), allowzero=1),
                     mats[key])
        else:  # an outer Sylvester block: the axis of size f in [..., prefix, f, rest], from the left
            y = b.op("MatMul", mats[key], b.op("Reshape", y, b.op("Concat", lead, b.const(dims), axis=0), allowzero=1))
    y = b.op("Reshape", y, b.op("Shape", x), allowzero=1)
    return b.op("Mul", y, b.const(1.0 / math.sqrt(n), np.float32))


def _hadamard(attrs: dict, overload: str, sch: OpSchema) -> onnx.FunctionProto:
    b = _Body()
    _transform(b, "X", attrs["n"], attrs["m"])
    return b.function(sch, overload, ["X"], ["Y"])


def _fused_input(b: _Body, attrs: dict) -> str:
    """The quantizers' input: X, or Hadamard(X) for the fused forms (hadamard > 0)."""
    return _transform(b, "X", attrs["hadamard"], attrs["hadamard_m"]) if attrs.get("hadamard") else "X"


def _dynamic_quantize(attrs: dict, overload: str, sch: OpSchema) -> onnx.FunctionProto:
    b = _Body()
    q, scale, zp = _quantize(b, _fused_input(b, attrs), symmetric=None, clip=None)
    b.op("Cast", q, to=TensorProto.INT8), b.op("Identity", scale), b.op("Cast", zp, to=TensorProto.INT8)
    return b.function(sch, overload, ["X"], ["Xq", "scale", "zero_point"])


def _qmatmul(attrs: dict, overload: str, sch: OpSchema) -> onnx.FunctionProto:
    """float32 GEMM of exact small integers: (Xq − x_zp)·(Wq − w_zp)ᵀ·w_scaleᵀ·x_scale (+ bias); per
    group, W is dequantized to float32 first (w_scale/w_zp gathered per column: ⌊k / group_size⌋)."""
    b = _Body()
    f32 = TensorProto.FLOAT
    x = b.op("Sub", b.op("Cast", "Xq", to=f32), b.op("Cast", "x_zero_point", to=f32))
    w_zp, k = b.op("Cast", "w_zero_point", to=f32), b.attr("K")
    if attrs["bits"] == 4:  # nibble − 8 − zp
        w, w_zp = b.op("Cast", _unpack4(b, "W", k), to=f32), b.op("Add", w_zp, b.const(8.0, np.float32))
    else:
        w = b.op("Cast", "W", to=f32)
    if attrs["group_size"]:
        group = b.op("Div", b.op("Range", b.const(0), k, b.const(1)), b.attr("group_size"))
        w = b.op("Mul", b.op("Sub", w, b.op("Gather", w_zp, group, axis=1)), b.op("Gather", "w_scale", group, axis=1))
        y = b.op("MatMul", x, b.op("Transpose", w, perm=[1, 0]))
    else:
        acc = b.op("MatMul", x, b.op("Transpose", b.op("Sub", w, w_zp), perm=[1, 0]))
        y = b.op("Mul", acc, b.op("Transpose", "w_scale", perm=[1, 0]))
    y = b.op("Mul", y, "x_scale")
    if overload.endswith("_bias"):
        b.op("Add", y, "bias")
    inputs = list(sch.inputs if overload.endswith("_bias") else sch.inputs[:-1])
    return b.function(sch, overload, inputs, ["Y"])


def _residual_correction(attrs: dict, overload: str, sch: OpSchema) -> onnx.FunctionProto:
    b = _Body()
    low = b.op("MatMul", b.op("MatMul", b.op("MatMul", "X", "Q"), "M"), b.op("Transpose", "Q", perm=[1, 0]))
    y = b.op("Add", "X", low)
    if overload == "addend":
        b.op("Add", y, "Z")
    return b.function(sch, overload, ["X", "Q", "M", "Z"] if overload == "addend" else ["X", "Q", "M"], ["Y"])


def _quantize_kv(attrs: dict, overload: str, sch: OpSchema) -> onnx.FunctionProto:
    b = _Body()
    q, scale, zp = _quantize(b, _fused_input(b, attrs), symmetric=0, clip=1.0)
    if attrs["bits"] == 4:
        _pack4(b, b.op("Cast", b.op("Add", q, b.const(8.0, np.float32)), to=TensorProto.UINT8))
    else:
        b.op("Cast", q, to=TensorProto.INT8)
    b.op("Identity", scale), b.op("Cast", zp, to=TensorProto.INT8)
    return b.function(sch, overload, ["X"], ["Xq", "scale", "zero_point"])


def _dequantize_kv(attrs: dict, overload: str, sch: OpSchema) -> onnx.FunctionProto:
    b = _Body()
    f32 = TensorProto.FLOAT
    zp = b.op("Cast", "zero_point", to=f32)
    if overload == "u4":  # nibble − (zp + 8), exact in float32
        q, zp = b.op("Cast", _unpack4(b, "Xq", b.attr("head_dim")), to=f32), b.op("Add", zp, b.const(8.0, np.float32))
    else:
        q = b.op("Cast", "Xq", to=f32)
    b.op("Mul", b.op("Sub", q, zp), "scale")
    return b.function(sch, overload, ["Xq", "scale", "zero_point"], ["Y"])


_BUILDERS = {
    "Hadamard": _hadamard,
    "DynamicQuantize": _dynamic_quantize,
    "QMatMul": _qmatmul,
    "ResidualCorrection": _residual_correction,
    "QuantizeKV": _quantize_kv,
    "DequantizeKV": _dequantize_kv,
}
