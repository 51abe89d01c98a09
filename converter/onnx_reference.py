"""Rebuild the torch simulated-quant reference of an exported ONNX folder from the folder alone
(`respin-export parity DIR`): the transformers model of its `config.json` with the weights the graph
holds (dequantized from the exact codes and scales), ReSpinQuant's corrections from the graph's
`skip.{b}.Q|M` initializers, and the online quantization the export recorded (`respin.sim`).

The weights are read back from the graph, not re-derived from the source model, so the comparison
checks the graph's computation, not the conversion.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from converter.arch import decoder_layers, layer_linears, linear_param_name
from converter.errors import RespinError
from converter.onnx_runtime import MODEL_FILE
from converter.simquant import SimSpec
from rotations.online import SimQuantHandle, SkipCorrections, attach_simquant
from rotations.respin import SkipCorrection
from runtime_ops import reference

SIM_KEY = "respin.sim"


def sim_metadata(spec: SimSpec) -> dict[str, str]:
    """The model metadata that lets `load_reference` re-attach the export's online quantization."""
    return {SIM_KEY: json.dumps(spec.describe())}


def _initializers(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))  # with its external data
    return {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}


def _matmul_attrs(path: Path) -> dict[str, dict]:
    """Attributes of every weight-carrying node, keyed by the weight initializer's name."""
    graph = onnx.load(str(path), load_external_data=False).graph
    out = {}
    for node in graph.node:
        if node.op_type in ("MatMulNBits", "QMatMul"):
            weight = node.input[1] if node.op_type == "MatMulNBits" else node.input[3]
            out[weight] = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    return out


def _unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    return np.stack([packed & 15, packed >> 4], -1).reshape(packed.shape[0], -1)


def _dequantize(stem: str, inits: dict, attrs: dict) -> np.ndarray | None:
    """float32 [out, in] of a linear from its initializers (None if the graph has no such linear)."""
    if f"{stem}.weight_t" in inits:
        return inits[f"{stem}.weight_t"].T
    qname = f"{stem}.qweight"
    if qname not in inits:
        return None
    a, B, scales = attrs.get(qname), inits[qname], inits[f"{stem}.scales"]
    if a is None:  # 8-bit codes dequantized by constant folding in the graph
        return np.repeat(scales, B.shape[1] // scales.shape[1], axis=1) * B.astype(np.float32)
    if "block_size" in a:  # MatMulNBits: unsigned codes, zero points stored or 2^(bits-1)
        N, K, bits, block = a["N"], a["K"], a["bits"], a["block_size"]
        codes = _unpack_nibbles(B.reshape(N, -1)) if bits == 4 else B.reshape(N, -1)
        blocks = codes.shape[1] // block
        z = inits.get(f"{stem}.zero_points")
        if z is None:
            z = np.full((N, blocks), 2 ** (bits - 1), np.uint8)
        elif bits == 4:
            z = _unpack_nibbles(z.reshape(N, -1))[:, :blocks]
        z = np.repeat(z.reshape(N, blocks).astype(np.float32), block, axis=1)
        d = np.repeat(scales.reshape(N, -1), block, axis=1)
        return (d * (codes.astype(np.float32) - z))[:, :K]
    K, bits, group = a["K"], a["bits"], a.get("group_size", 0)
    codes = reference.unpack_int4(B, K) if bits == 4 else B
    d = np.repeat(scales, group or K, axis=1)[:, :K]
    return d * (codes.astype(np.float32) - np.repeat(inits[f"{stem}.zero_points"], group or K, axis=1)[:, :K])


def _embedding(inits: dict) -> np.ndarray:
    if "embed_tokens.weight" in inits:
        return inits["embed_tokens.weight"]
    codes, scales = inits["embed_tokens.qweight"], inits["embed_tokens.scales"]
    block = codes.shape[1] // scales.shape[1]
    return np.repeat(scales, block, axis=1) * codes.astype(np.float32)


def load_reference(folder: Path) -> tuple[torch.nn.Module, SimQuantHandle]:
    """The torch model that the folder's graph computes (simulated quantization attached)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    path = folder / MODEL_FILE
    if not (folder / "config.json").is_file():
        raise RespinError(f"{folder} has no config.json: re-export it with this version of respin-export")
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    if SIM_KEY not in meta:
        raise RespinError(f"{path} has no {SIM_KEY} metadata: not exported by respin-export")
    spec = SimSpec(**json.loads(meta[SIM_KEY]))
    inits, attrs = _initializers(path), _matmul_attrs(path)
    config = AutoConfig.from_pretrained(folder)
    config.tie_word_embeddings = False
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.from_numpy(_embedding(inits)))
        model.lm_head.weight.copy_(torch.from_numpy(_dequantize("lm_head", inits, attrs)))
        for i, layer in enumerate(decoder_layers(model)):
            for short, linear in layer_linears(layer).items():
                stem = linear_param_name(i, short).removesuffix(".weight")
                linear.weight.copy_(torch.from_numpy(_dequantize(stem, inits, attrs)))
                if linear.bias is not None:
                    linear.bias.copy_(torch.from_numpy(inits[f"{stem}.bias"]))
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)  # folded into the linears at export
    n_blocks = 2 * config.num_hidden_layers
    corrections = None
    if any(f"skip.{b}.Q" in inits for b in range(n_blocks)):
        D = config.hidden_size
        empty = SkipCorrection(torch.zeros(D, 0), torch.zeros(0, 0))
        corrections = SkipCorrections([
            SkipCorrection(torch.from_numpy(inits[f"skip.{b}.Q"]).double(), torch.from_numpy(inits[f"skip.{b}.M"]).double())
            if f"skip.{b}.Q" in inits else empty for b in range(n_blocks)])
    return model, attach_simquant(model, spec.online(), corrections)
