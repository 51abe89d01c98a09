"""Quantize a whole model: GPTQ layer by layer on calibration activations, or RTN.

GPTQ sees the activations of the model *as rotated* (the caller passes the fused model), and layer
`i` is calibrated on the outputs of the already-quantized layers `< i`, as in the GPTQ paper.
Only one layer's inputs are held at a time ([samples, seq, hidden]), so memory stays bounded.
The model passed in is left unchanged: quantized weights live in the returned `QuantizedModel`.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from converter.arch import decoder_layers, layer_linears, linear_param_name
from converter.quantization.gptq import GPTQConfig, HessianAccumulator, gptq_quantize
from converter.quantization.grids import GridSpec, QuantizedTensor, grid
from converter.quantization.rtn import rtn_quantize

logger = logging.getLogger(__name__)

QUANT_METHODS = ("gptq", "rtn")
FLOAT_WTYPE = "f32"  # no quantization: the FP reference file
# llama.cpp's mixed file types: one grid per tensor by llama-quantize's rules (converter.gguf_mixture)
MIXTURE_WTYPES = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
# An 8-bit head/embedding (vocab × hidden, the largest tensors) is rounded to nearest without clip
# search: its rounding step is ~17× finer than at 4 bits, while on SmolLM2's 49152×576 head GPTQ
# took ~2 min and clip search ~30 s on 2 cores. 4-bit heads get GPTQ (and clip search) like the body.
HEAD_RTN_MIN_BITS = 8
# Linears reading the same input share one Hessian.
INPUT_GROUPS = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "o_in",
                "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "down_in"}


@dataclass(frozen=True)
class QuantConfig:
    """`wtype` is one grid for every decoder linear (`head_type` for lm_head and the embedding), or,
    with `tensor_grids` filled (a llama.cpp mixture such as "q4_k_m", see converter.gguf_mixture),
    the grid of each tensor by its transformers name ("f32": left unquantized)."""

    method: str = "gptq"  # "gptq" | "rtn"
    wtype: str = "q4_0"  # grid of the decoder linears, or a mixture's name
    head_type: str = "q8_0"  # grid of lm_head and the token embedding (4-bit heads cause repetition)
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    rtn_clip_search: bool = True
    batch_size: int = 4  # calibration samples per forward
    tensor_grids: dict[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.method not in QUANT_METHODS:
            raise ValueError(f"unknown quantization method '{self.method}': supported are {', '.join(QUANT_METHODS)}")
        for name in self.tensor_grids.values():
            if name != FLOAT_WTYPE:
                grid(name)
        if self.wtype not in (FLOAT_WTYPE, *MIXTURE_WTYPES) and not self.tensor_grids:
            grid(self.wtype)
            grid(self.head_type)

    def spec_for(self, param_name: str, default: str) -> GridSpec | None:
        """The grid of one tensor (None: keep it float); `default` is wtype or head_type."""
        name = self.tensor_grids.get(param_name, default) if self.tensor_grids else default
        return None if name == FLOAT_WTYPE else grid(name)

    @property
    def quantizes(self) -> bool:
        return self.wtype != FLOAT_WTYPE

    @property
    def needs_calibration(self) -> bool:
        return self.quantizes and self.method == "gptq"

    def describe(self) -> dict:
        out = {"method": self.method, "wtype": self.wtype, "head_type": self.head_type,
               "gptq": vars(self.gptq) if self.method == "gptq" else None,
               "rtn_clip_search": self.rtn_clip_search if self.method == "rtn" else None}
        if self.tensor_grids:
            counts: dict[str, int] = {}
            for name in self.tensor_grids.values():
                counts[name] = counts.get(name, 0) + 1
            out["tensor_grid_counts"] = dict(sorted(counts.items()))
        return out


@dataclass
class QuantizedModel:
    """Integer codes + scales per quantized weight, keyed by the transformers parameter name."""

    tensors: dict[str, QuantizedTensor]
    config: QuantConfig
    n_calibration_tokens: int = 0

    def dequantized(self) -> dict[str, torch.Tensor]:
        return {name: qt.dequantize() for name, qt in self.tensors.items()}


def quantize_model(model: torch.nn.Module, cfg: QuantConfig, calibration: torch.Tensor | None = None) -> QuantizedModel:
    """Quantize embedding, every decoder linear and lm_head of `model` (float32, fused).

    calibration: token ids [n_samples, seq_len]; required for GPTQ.
    """
    tensors: dict[str, QuantizedTensor] = {}
    if not cfg.quantizes:
        return QuantizedModel(tensors, cfg, 0)

    def rtn(name: str, w: torch.Tensor, default: str, clip) -> None:
        spec = cfg.spec_for(name, default)
        if spec is not None:
            tensors[name] = rtn_quantize(w.detach().float(), spec, clip_search=clip(spec))

    head_clip = lambda spec: _clip_head(cfg, spec)  # noqa: E731
    # The embedding is a lookup, not a matmul: no Hessian, RTN on its rows.
    rtn("model.embed_tokens.weight", model.model.embed_tokens.weight, cfg.head_type, head_clip)
    if cfg.method == "rtn":
        for i, layer in enumerate(tqdm(decoder_layers(model), desc="RTN", unit="layer")):
            for short, linear in layer_linears(layer).items():
                rtn(linear_param_name(i, short), linear.weight, cfg.wtype, lambda _spec: cfg.rtn_clip_search)
        rtn("lm_head.weight", model.lm_head.weight, cfg.head_type, head_clip)
        return QuantizedModel(tensors, cfg, 0)
    if calibration is None:
        raise ValueError("GPTQ needs calibration token ids")
    hidden, layer_kwargs = _capture_layer0_inputs(model, calibration, cfg.batch_size)
    for i, layer in enumerate(tqdm(decoder_layers(model), desc="GPTQ", unit="layer")):
        specs = {short: cfg.spec_for(linear_param_name(i, short), cfg.wtype) for short in layer_linears(layer)}
        layer_q = _gptq_layer(layer, hidden, layer_kwargs, specs, cfg.gptq)
        tensors.update({linear_param_name(i, short): qt for short, qt in layer_q.items()})
        with _weights_swapped(layer_linears(layer), {s: qt.dequantize() for s, qt in layer_q.items()}):
            hidden = [layer(h, **kw) for h, kw in zip(hidden, layer_kwargs)]
    head_spec = cfg.spec_for("lm_head.weight", cfg.head_type)
    head = model.lm_head.weight.detach().float()
    if head_spec is None:
        pass
    elif head_spec.bits >= HEAD_RTN_MIN_BITS:
        tensors["lm_head.weight"] = rtn_quantize(head, head_spec, clip_search=False)
    else:
        acc = HessianAccumulator(model.lm_head.in_features, device=model.lm_head.weight.device)
        with torch.no_grad():
            for h in hidden:
                acc.add(model.model.norm(h))
        tensors["lm_head.weight"] = gptq_quantize(head, acc.H, head_spec, cfg.gptq)
    return QuantizedModel(tensors, cfg, int(calibration.numel()))


def _clip_head(cfg: QuantConfig, head_spec) -> bool:
    return cfg.rtn_clip_search and head_spec.bits < HEAD_RTN_MIN_BITS


class _StopForward(Exception):
    pass


@torch.no_grad()
def _capture_layer0_inputs(model, calibration: torch.Tensor, batch_size: int):
    """Hidden states entering layer 0 and the keyword arguments (RoPE, mask) the model passes it."""
    hidden, kwargs_list = [], []

    def grab(_module, args, kwargs):
        hidden.append(args[0] if args else kwargs.pop("hidden_states"))
        kwargs_list.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    # prepend: grab the stream before any simulated-quant hook of the layer transforms it
    handle = decoder_layers(model)[0].register_forward_pre_hook(grab, with_kwargs=True, prepend=True)
    try:
        for chunk in calibration.split(batch_size):
            try:
                model.model(input_ids=chunk, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return hidden, kwargs_list


@torch.no_grad()
def _gptq_layer(layer, hidden, layer_kwargs, specs: dict[str, GridSpec | None],
                gptq_cfg: GPTQConfig) -> dict[str, QuantizedTensor]:
    """GPTQ every linear of one layer (grid `specs[short]`, None: left float) from the Hessians of
    its inputs (the layers before already quantized)."""
    linears = {short: linear for short, linear in layer_linears(layer).items() if specs[short] is not None}
    accs = {group: None for group in set(INPUT_GROUPS.values())}
    handles = []
    for short, linear in linears.items():
        group = INPUT_GROUPS[short]
        if accs[group] is None:
            accs[group] = HessianAccumulator(linear.in_features, device=linear.weight.device)
            handles.append(linear.register_forward_hook(lambda _m, inp, _out, a=accs[group]: a.add(inp[0])))
    try:
        for h, kw in zip(hidden, layer_kwargs):
            layer(h, **kw)
    finally:
        for handle in handles:
            handle.remove()
    return {short: gptq_quantize(linear.weight.detach().float(), accs[INPUT_GROUPS[short]].H, specs[short], gptq_cfg)
            for short, linear in linears.items()}


@contextmanager
def _weights_swapped(linears: dict[str, torch.nn.Linear], weights: dict[str, torch.Tensor]):
    saved = {short: linears[short].weight.data for short in weights}
    try:
        for short, w in weights.items():
            linears[short].weight.data = w.to(saved[short].dtype)
        yield
    finally:
        for short, w in saved.items():
            linears[short].weight.data = w


def load_quantized_weights(model: torch.nn.Module, qmodel: QuantizedModel) -> None:
    """Put the exact dequantized weights into `model` (in place): the torch model of the exported file."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, w in qmodel.dequantized().items():
            params[name].copy_(w.to(params[name].dtype))
