"""ONNX decoder with KV cache for onnxruntime: FP32, W4A16 (`com.microsoft::MatMulNBits`) and
W4A4(KV4) (custom `respin` ops with model-local function bodies).

The graph computes what the simulated-quant torch model computes (`converter.simquant`): the
rotated, folded model; activations quantized per token at the input of every decoder linear
(W4A4); R3 Hadamard on Q/K after RoPE and the K/V cache stored as per-token-and-head codes (KV4);
R4 Hadamard before down_proj; ReSpinQuant skip corrections on the residual stream
(`x_next = RC_b(x) + block(x)`, what the simulated model's hooks are equivalent to).

IO names follow onnxruntime-genai / optimum (DESIGN §6): `input_ids`, `attention_mask`,
`position_ids`, `past_key_values.{i}.key|value` → `logits`, `present.{i}.key|value`; a quantized
cache adds `…key_scale`, `…key_zero_point` (and the same for value) beside the codes.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from onnx import TensorProto

from converter.arch import ModelShape, decoder_layers, layer_linears, linear_param_name
from converter.errors import RespinError
from converter.onnx_graph import MS_DOMAIN, GraphBuilder
from converter.quantization.calibrate import QuantizedModel
from converter.quantization.fake_quant import ActQuantSpec
from converter.quantization.grids import QuantizedTensor
from runtime_ops import reference

logger = logging.getLogger(__name__)

MATMULNBITS_BLOCKS = (16, 32, 64, 128, 256)
MASK_MIN = float(np.finfo(np.float32).min)


@dataclass(frozen=True)
class OnnxGraphConfig:
    """What runs online in the exported graph (weights come quantized or not in the QuantizedModel)."""

    act: ActQuantSpec = ActQuantSpec()  # activation quantization at decoder-linear inputs
    kv_bits: int = 16  # 4 / 8: the cache is stored as codes
    r3: bool = False  # Hadamard on Q/K after RoPE
    r4: bool = False  # Hadamard before down_proj (W_down must be fused with it)

    def __post_init__(self) -> None:
        if self.kv_bits not in (4, 8, 16):
            raise RespinError(f"ONNX KV cache bits must be 4, 8 or 16 (got {self.kv_bits})")

    @property
    def kv_quantized(self) -> bool:
        return self.kv_bits < 16


@dataclass(frozen=True)
class KVLayout:
    """Per-layer cache tensors: names, element types and the last axis of each."""

    names: tuple[str, ...]
    elem_types: tuple[int, ...]
    last_dims: tuple[int, ...]


def kv_layout(cfg: OnnxGraphConfig, head_dim: int) -> KVLayout:
    if not cfg.kv_quantized:
        return KVLayout(("key", "value"), (TensorProto.FLOAT,) * 2, (head_dim,) * 2)
    code_type, code_dim = ((TensorProto.UINT8, (head_dim + 1) // 2) if cfg.kv_bits == 4
                           else (TensorProto.INT8, head_dim))
    names, types, dims = [], [], []
    for kind in ("key", "value"):
        names += [kind, f"{kind}_scale", f"{kind}_zero_point"]
        types += [code_type, TensorProto.FLOAT, TensorProto.INT8]
        dims += [code_dim, 1, 1]
    return KVLayout(tuple(names), tuple(types), tuple(dims))


# --- weights -----------------------------------------------------------------------------------

def _signed_codes(qt: QuantizedTensor) -> np.ndarray:
    """Codes of a symmetric grid as signed integers c with value = d·c (zero point folded)."""
    if not qt.spec.symmetric:
        raise RespinError(f"grid {qt.spec.name}: integer kernels need a symmetric weight grid")
    return (qt.codes.to(torch.int32) - qt.spec.zero_point).numpy()


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """uint8 [..., n] codes in [0, 15] → [..., ceil(n / 2)] bytes, low nibble first (MatMulNBits' order)."""
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], 1), np.uint8)], axis=-1)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def _matmulnbits_weight(qt: QuantizedTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict]:
    """(B uint8 [N, blocks, blob], scales float32 [N·blocks], zero points or None, attrs) of a block grid.

    Symmetric grids leave out the zero points: MatMulNBits' default 2^(bits−1) reproduces
    value = d·(q − zero_point) exactly. Integer-zero-point grids store theirs, value = d·(q − z),
    packed per row as MatMulNBits reads them (uint8 [N · ceil(blocks·bits/8)])."""
    N, K = qt.shape
    bits = 4 if qt.spec.bits <= 4 else 8
    block = qt.spec.group_for(K)
    if block not in MATMULNBITS_BLOCKS:
        raise RespinError(f"MatMulNBits needs a block size in {MATMULNBITS_BLOCKS} (grid {qt.spec.name} has {block})")
    zero_points = None
    if qt.spec.integer_zero_point:
        unsigned = qt.codes.numpy().astype(np.uint8)
        z = qt.offset.numpy().astype(np.uint8)
        pad = z[:, -1:]  # padding codes equal the last block's zero point: they dequantize to 0
        zero_points = (_pack_nibbles(z) if bits == 4 else z).reshape(-1)
    elif qt.spec.symmetric:
        unsigned = (_signed_codes(qt) + 2 ** (bits - 1)).astype(np.uint8)
        pad = np.full((N, 1), 2 ** (bits - 1), np.uint8)
    else:
        raise RespinError(f"grid {qt.spec.name}: MatMulNBits stores value = d·(q − z) with an integer z; "
                          "a float min (Q4_1) has no exact form there")
    blocks = -(-K // block)
    padded = np.repeat(pad, blocks * block, axis=1)
    padded[:, :K] = unsigned
    if bits == 4:
        padded = _pack_nibbles(padded)
    B = padded.reshape(N, blocks, -1)
    scales = qt.scale.float().numpy().astype(np.float32).reshape(-1)
    return B, scales, zero_points, {"K": K, "N": N, "bits": bits, "block_size": block}


def _qmatmul_weight(qt: QuantizedTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """(W packed, w_scale [N, G], w_zero_point [N, G], attrs) for `respin::QMatMul`."""
    N, K = qt.shape
    codes = _signed_codes(qt)
    bits = 4 if qt.spec.bits <= 4 else 8
    W = reference.pack_int4(codes) if bits == 4 else codes.astype(np.int8)
    scale = qt.scale.float().numpy().astype(np.float32)
    return W, scale, np.zeros(scale.shape, np.int8), {"K": K, "bits": bits, "group_size": qt.spec.group_size}


class DecoderBuilder:
    """Emits the decoder graph of one rotated, folded transformers model."""

    def __init__(self, g: GraphBuilder, model: torch.nn.Module, qmodel: QuantizedModel | None,
                 shape: ModelShape, cfg: OnnxGraphConfig, corrections: list | None) -> None:
        self.g, self.model, self.shape, self.cfg = g, model, shape, cfg
        self.tensors = {} if qmodel is None else qmodel.tensors
        self.corrections = corrections

    # --- building blocks ------------------------------------------------------------------------
    def linear(self, x: str, pname: str, xq: tuple[str, str, str] | None, bias: torch.Tensor | None) -> str:
        """y = x Wᵀ (+ b): MatMul (FP32), MatMulNBits (A16) or QMatMul on the activation codes xq."""
        g, qt = self.g, self.tensors.get(pname)
        stem = pname.removesuffix(".weight")
        if qt is None:
            w = self.model.get_parameter(pname).detach().float().numpy()
            y = g.op("MatMul", [x, g.initializer(f"{stem}.weight_t", w.T.copy())], name=stem)
        elif qt.spec.bits > 4 and xq is None and qt.shape[1] % qt.spec.group_for(qt.shape[1]) == 0:
            y = g.op("MatMul", [x, self.folded_weight(stem, qt)], name=stem)
        elif xq is not None:
            W, ws, wz, attrs = _qmatmul_weight(qt)
            inputs = [*xq, g.initializer(f"{stem}.qweight", W), g.initializer(f"{stem}.scales", ws),
                      g.initializer(f"{stem}.zero_points", wz)]
            if bias is not None:
                inputs.append(g.initializer(f"{stem}.bias", bias.detach().float().numpy()))
                bias = None
            y = g.custom("QMatMul", inputs, name=stem, **attrs)
        else:
            B, scales, zero_points, attrs = _matmulnbits_weight(qt)
            inputs = [x, g.initializer(f"{stem}.qweight", B), g.initializer(f"{stem}.scales", scales)]
            if zero_points is not None:
                inputs.append(g.initializer(f"{stem}.zero_points", zero_points))
            y = g.op("MatMulNBits", inputs, name=stem, domain=MS_DOMAIN, **attrs)
        if bias is not None:
            y = g.op("Add", [y, g.initializer(f"{stem}.bias", bias.detach().float().numpy())])
        return y

    def folded_weight(self, stem: str, qt: QuantizedTensor) -> str:
        """Wᵀ [in, out] as float(codes)·scale from int8 codes + scales: every input is an initializer,
        so onnxruntime's constant folding computes it once at session creation (the file keeps 8-bit
        codes; runtime matmuls are float32). Used for 8-bit weights read by float activations (the
        head): onnxruntime's 8-bit MatMulNBits without int8 activations was ~150 ms per call for
        SmolLM2's 49152×576 head, this ~5 ms."""
        g = self.g
        N, K = qt.shape
        gs = qt.spec.group_for(K)
        codes = g.initializer(f"{stem}.qweight", _signed_codes(qt).astype(np.int8))
        scales = g.initializer(f"{stem}.scales", qt.scale.float().numpy())
        blocks = g.op("Reshape", [g.op("Cast", [codes], to=TensorProto.FLOAT), g.const([N, K // gs, gs])])
        w = g.op("Reshape", [g.op("Mul", [blocks, g.op("Unsqueeze", [scales, g.const([-1])])]), g.const([N, K])])
        return g.op("Transpose", [w], perm=[1, 0], name=f"{stem}.weight_t")

    def quantize_act(self, x: str, hadamard: int = 0) -> tuple[str, str, str] | None:
        """Per-token activation codes of x — of Hadamard(x) when `hadamard` = n (fused: one node, one read)."""
        act = self.cfg.act
        if not act.enabled:
            return None
        fused = _fused_hadamard(hadamard)
        return tuple(self.g.custom("DynamicQuantize", [x], 3, bits=act.bits, symmetric=int(act.symmetric),
                                   clip=float(act.clip), **fused))

    def rms_norm(self, x: str, norm: torch.nn.Module) -> str:
        """x / sqrt(mean(x²) + eps) · g (g = 1 after folding: then no Mul)."""
        g = self.g
        eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", self.shape.rms_eps)))
        var = g.op("ReduceMean", [g.op("Mul", [x, x]), g.const([-1])], keepdims=1)
        inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [var, g.const(eps, np.float32)])])])
        y = g.op("Mul", [x, inv])
        weight = norm.weight.detach().float()
        if not torch.all(weight == 1):
            y = g.op("Mul", [y, g.initializer(g.fresh("norm.weight"), weight.numpy())])
        return y

    def hadamard(self, x: str, n: int) -> str:
        from rotations.hadamard import hadamard_factorization

        return self.g.custom("Hadamard", [x], n=n, m=hadamard_factorization(n)[1])

    def residual(self, x: str, out: str, b: int, name: str) -> str:
        """x + out through ReSpinQuant's skip path of block b: one ResidualCorrection node with the
        add fused in (Z = out), or a plain Add without corrections or at rank 0."""
        c = None if self.corrections is None else self.corrections[b]
        Q, M = _correction_matrices(c) if c is not None else (None, None)
        g = self.g
        if Q is None or Q.shape[1] == 0:
            return g.op("Add", [x, out], name=name)
        return g.custom("ResidualCorrection", [x, g.initializer(f"skip.{b}.Q", Q), g.initializer(f"skip.{b}.M", M), out],
                        name=f"skip.{b}")

    # --- the graph --------------------------------------------------------------------------------
    def build(self) -> None:
        g, s = self.g, self.shape
        ids = g.input("input_ids", TensorProto.INT64, ["batch", "sequence"])
        mask = g.input("attention_mask", TensorProto.INT64, ["batch", "total_sequence"])
        pos = g.input("position_ids", TensorProto.INT64, ["batch", "sequence"])
        layout = kv_layout(self.cfg, s.head_dim)
        x = self.embed(ids)
        cos, sin = self.rope(pos)
        bias = self.attention_bias(ids, mask)
        for i, layer in enumerate(decoder_layers(self.model)):
            past = [g.input(f"past_key_values.{i}.{n}", t, ["batch", s.n_kv_heads, "past_sequence", d])
                    for n, t, d in zip(layout.names, layout.elem_types, layout.last_dims)]
            x, present = self.layer(i, layer, x, cos, sin, bias, past)
            for n, t, d, value in zip(layout.names, layout.elem_types, layout.last_dims, present):
                g.output(value, f"present.{i}.{n}", t, ["batch", s.n_kv_heads, "total_sequence", d])
        h = self.rms_norm(x, self.model.model.norm)
        logits = self.linear(h, "lm_head.weight", None, self.model.lm_head.bias)
        g.output(logits, "logits", TensorProto.FLOAT, ["batch", "sequence", s.vocab])

    def embed(self, ids: str) -> str:
        g, qt = self.g, self.tensors.get("model.embed_tokens.weight")
        if qt is None:
            table = self.model.model.embed_tokens.weight.detach().float().numpy()
            return g.op("Gather", [g.initializer("embed_tokens.weight", table), ids], name="embed")
        # int8 codes + one scale per block, dequantized after the lookup (value = d·(q − zero_point))
        codes = g.initializer("embed_tokens.qweight", _signed_codes(qt).astype(np.int8))
        scales = g.initializer("embed_tokens.scales", qt.scale.float().numpy())
        block = qt.spec.group_for(qt.shape[1])
        rows = g.op("Cast", [g.op("Gather", [codes, ids])], to=TensorProto.FLOAT)
        rows = g.op("Reshape", [rows, g.const([0, 0, qt.shape[1] // block, block])])
        d = g.op("Unsqueeze", [g.op("Gather", [scales, ids]), g.const([-1])])
        return g.op("Reshape", [g.op("Mul", [rows, d]), g.const([0, 0, qt.shape[1]])], name="embed")

    def rope(self, pos: str) -> tuple[str, str]:
        """cos, sin [batch, 1, seq, head_dim] exactly as transformers' rotary embedding forms them."""
        g = self.g
        rotary = self.model.model.rotary_emb
        inv_freq = rotary.inv_freq.detach().float().numpy()
        freqs = g.op("Mul", [g.op("Unsqueeze", [g.op("Cast", [pos], to=TensorProto.FLOAT), g.const([-1])]),
                             g.initializer("rope.inv_freq", inv_freq)])
        emb = g.op("Concat", [freqs, freqs], axis=-1)
        scale = float(getattr(rotary, "attention_scaling", 1.0))
        out = []
        for fn in ("Cos", "Sin"):
            v = g.op(fn, [emb])
            if scale != 1.0:
                v = g.op("Mul", [v, g.const(scale, np.float32)])
            out.append(g.op("Unsqueeze", [v, g.const([1])], name=f"rope.{fn.lower()}"))
        return out[0], out[1]

    def attention_bias(self, ids: str, mask: str) -> str:
        """Additive mask [batch, 1, 1, seq, total]: causal over the cache + padding from attention_mask."""
        g = self.g
        total = g.op("Gather", [g.op("Shape", [mask]), g.const(1)])
        seq = g.op("Gather", [g.op("Shape", [ids]), g.const(1)])
        k_pos = g.op("Range", [g.const(0), total, g.const(1)])
        q_pos = g.op("Range", [g.op("Sub", [total, seq]), total, g.const(1)])
        causal = g.op("LessOrEqual", [g.op("Unsqueeze", [k_pos, g.const([0])]),
                                      g.op("Unsqueeze", [q_pos, g.const([1])])])  # [seq, total]
        keep = g.op("Cast", [g.op("Unsqueeze", [mask, g.const([1, 2, 3])])], to=TensorProto.BOOL)
        allowed = g.op("And", [causal, keep])  # [batch, 1, 1, seq, total]
        return g.op("Where", [allowed, g.const(0.0, np.float32), g.const(MASK_MIN, np.float32)], name="attn_bias")

    def layer(self, i: int, layer, x: str, cos: str, sin: str, bias: str, past: list[str]):
        g, s, cfg = self.g, self.shape, self.cfg
        attn, mlp = layer.self_attn, layer.mlp
        p = lambda short: linear_param_name(i, short)  # noqa: E731
        h = self.rms_norm(x, layer.input_layernorm)
        hq = self.quantize_act(h)
        q, k, v = (self.linear(h, p(n), hq, getattr(layer_linears(layer)[n], "bias", None))
                   for n in ("q_proj", "k_proj", "v_proj"))
        q = self.heads(q, s.n_heads)
        k = self.heads(k, s.n_kv_heads)
        v = self.heads(v, s.n_kv_heads)
        q, k = self.apply_rope(q, cos, sin), self.apply_rope(k, cos, sin)
        # R3: Hadamard on Q, and on K — inside the cache's QuantizeKV when the cache is quantized
        k_fused = cfg.r3 and cfg.kv_quantized
        if cfg.r3:
            q = self.hadamard(q, s.head_dim)
            k = k if k_fused else self.hadamard(k, s.head_dim)
        k_all, v_all, present = self.cache(k, v, past, k_hadamard=s.head_dim if k_fused else 0)
        o = self.attend(q, k_all, v_all, bias)
        o = self.linear(o, p("o_proj"), self.quantize_act(o), attn.o_proj.bias)
        x = self.residual(x, o, 2 * i, name=f"layers.{i}.attn_residual")
        h = self.rms_norm(x, layer.post_attention_layernorm)
        hq = self.quantize_act(h)
        gate = self.linear(h, p("gate_proj"), hq, mlp.gate_proj.bias)
        up = self.linear(h, p("up_proj"), hq, mlp.up_proj.bias)
        a = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])  # SiLU(gate)·up
        # R4: fused into down_proj's activation quantization when QMatMul consumes the codes
        if cfg.r4 and cfg.act.enabled and p("down_proj") in self.tensors:
            aq = self.quantize_act(a, hadamard=s.intermediate)
        else:
            a = self.hadamard(a, s.intermediate) if cfg.r4 else a
            aq = self.quantize_act(a)
        d = self.linear(a, p("down_proj"), aq, mlp.down_proj.bias)
        x = self.residual(x, d, 2 * i + 1, name=f"layers.{i}.mlp_residual")
        return x, present

    def heads(self, x: str, n: int) -> str:
        """[batch, seq, n·dh] → [batch, n, seq, dh]."""
        g = self.g
        return g.op("Transpose", [g.op("Reshape", [x, g.const([0, 0, n, self.shape.head_dim])])], perm=[0, 2, 1, 3])

    def apply_rope(self, x: str, cos: str, sin: str) -> str:
        g = self.g
        x1, x2 = g.op("Split", [x], 2, axis=-1, num_outputs=2)
        rotated = g.op("Concat", [g.op("Neg", [x2]), x1], axis=-1)
        return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rotated, sin])])

    def cache(self, k: str, v: str, past: list[str], k_hadamard: int = 0) -> tuple[str, str, list[str]]:
        """Append this step's K/V to the cache; returns the attention's K, V and the present tensors.
        k_hadamard = head_dim: K is stored as the codes of Hadamard(K) (R3 fused into QuantizeKV)."""
        g = self.g
        if not self.cfg.kv_quantized:
            present = [g.op("Concat", [past[0], k], axis=2), g.op("Concat", [past[1], v], axis=2)]
            return present[0], present[1], present
        bits, present, full = self.cfg.kv_bits, [], []
        for j, new in enumerate((k, v)):
            codes = g.custom("QuantizeKV", [new], 3, bits=bits, **_fused_hadamard(k_hadamard if j == 0 else 0))
            stored = [g.op("Concat", [past[3 * j + t], codes[t]], axis=2) for t in range(3)]
            present += stored
            full.append(g.custom("DequantizeKV", stored, bits=bits, head_dim=self.shape.head_dim))
        return full[0], full[1], present

    def attend(self, q: str, k: str, v: str, bias: str) -> str:
        """softmax(Q Kᵀ/√dh + bias) V with GQA by broadcasting: q [b, H, s, dh] as [b, n_kv, group, s, dh]."""
        g, s = self.g, self.shape
        group = s.n_heads // s.n_kv_heads
        q5 = g.op("Reshape", [q, g.const([0, s.n_kv_heads, group, -1, s.head_dim])])
        k5 = g.op("Unsqueeze", [k, g.const([2])])
        v5 = g.op("Unsqueeze", [v, g.const([2])])
        scores = g.op("MatMul", [q5, g.op("Transpose", [k5], perm=[0, 1, 2, 4, 3])])
        scores = g.op("Add", [g.op("Mul", [scores, g.const(1.0 / math.sqrt(s.head_dim), np.float32)]), bias])
        out = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v5])  # [b, n_kv, group, s, dh]
        out = g.op("Reshape", [out, g.const([0, s.n_heads, -1, s.head_dim])])
        out = g.op("Transpose", [out], perm=[0, 2, 1, 3])
        return g.op("Reshape", [out, g.const([0, 0, s.n_heads * s.head_dim])])


def _fused_hadamard(n: int) -> dict[str, int]:
    """The fused quantizers' attributes for a Hadamard of size n first (none for n = 0)."""
    if not n:
        return {}
    from rotations.hadamard import hadamard_factorization

    return {"hadamard": n, "hadamard_m": hadamard_factorization(n)[1]}


def _correction_matrices(c) -> tuple[np.ndarray, np.ndarray]:
    """(Q [D, r], M [r, r]) float32 of a skip correction; an exact dense T as Q = I, M = T − I."""
    if hasattr(c, "Q"):
        return c.Q.float().numpy().astype(np.float32), c.M.float().numpy().astype(np.float32)
    T = c.T.double()
    eye = torch.eye(T.shape[0], dtype=torch.float64)
    return eye.float().numpy(), (T - eye).float().numpy()


def build_decoder(model_path: Path, model: torch.nn.Module, qmodel: QuantizedModel | None, shape: ModelShape,
                  cfg: OnnxGraphConfig, corrections: list | None, metadata: dict[str, str]):
    """Write `model_path` (+ its external data file beside it); returns the ModelProto without weights."""
    import onnx

    data_name = model_path.name + ".data"
    g = GraphBuilder(model_path.parent / data_name, data_name)
    try:
        with torch.no_grad():
            DecoderBuilder(g, model, qmodel, shape, cfg, corrections).build()
        proto = g.model("respin-export decoder", metadata)
    finally:
        g.close_data()
    onnx.save_model(proto, str(model_path))
    return proto
