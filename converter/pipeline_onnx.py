"""--to onnx: rotations → simulated-quant torch model (the reference, with GPTQ weights) → ONNX folder →
parity of onnxruntime (function bodies, and our kernels when built) against that reference."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch

from converter import __version__
from converter.data import evaluation_tokens
from converter.errors import RespinError
from converter.export_onnx import MATMULNBITS_BLOCKS, OnnxGraphConfig
from converter.loading import LoadedModel
from converter.onnx_folder import write_onnx_folder
from converter.onnx_reference import sim_metadata
from converter.parity import noise_floor, perplexity, runtime_parity
from converter.report import Timings
from converter.simquant import SimSpec, model_macs_per_token
from rotations.rotations import LEARNED_KINDS

logger = logging.getLogger(__name__)

# W4A16 weights: MatMulNBits blocks on a symmetric grid (Q4_0's, fp16 scales: the GGUF grid too;
# --group-size picks "q4_0_g64" etc.), or with --asym an integer zero point per block ("q4_zp")
A16_WEIGHT_GRID = {4: "q4_0", 8: "q8_0"}
A16_ASYM_GRID = "q4_zp"


def a16_weight_grid(wbits: int, group_size: int, asym: bool = False) -> str:
    """The W4A16/W8A16 grid name for a MatMulNBits block size, e.g. (4, 128) → "q4_0_g128",
    (4, 32, asym) → "q4_zp_g32"."""
    if group_size not in MATMULNBITS_BLOCKS:
        raise RespinError(f"--group-size must be one of {', '.join(map(str, MATMULNBITS_BLOCKS))} (got {group_size})")
    if asym and wbits != 4:
        raise RespinError(f"asymmetric MatMulNBits blocks are 4-bit only (got --wbits {wbits})")
    return f"{A16_ASYM_GRID if asym else A16_WEIGHT_GRID[4 if wbits <= 4 else 8]}_g{group_size}"


def onnx_sim_spec(spec: SimSpec) -> SimSpec:
    """The simulated model the ONNX graph computes: A16 → MatMulNBits block grid, no online R4 (and R3
    only with a quantized cache); low-bit activations → per-channel int weights for QMatMul."""
    if spec.abits == 16:
        if spec.wbits not in A16_WEIGHT_GRID and spec.wbits != 16:
            raise RespinError(f"--to onnx with --abits 16 supports --wbits 4, 8 or 16 (got {spec.wbits})")
        return replace(spec, wgrid=spec.wgrid or A16_WEIGHT_GRID.get(spec.wbits, ""), r4=False, r3=spec.kvbits < 16)
    if spec.wbits > 8:
        raise RespinError("--to onnx with low-bit activations needs --wbits 2..8 (integer GEMM)")
    return spec


def graph_config(spec: SimSpec) -> OnnxGraphConfig:
    online = spec.online()
    return OnnxGraphConfig(act=online.act, kv_bits=spec.kvbits, r3=spec.r3, r4=spec.r4)


def export_onnx(cfg, loaded: LoadedModel, corpus, probe: torch.Tensor, timings: Timings) -> dict:
    from converter.pipeline import _save_learned, obtain_rotations, quantize_simulated, rotations_artefact_path

    output = Path(cfg.output)
    spec = onnx_sim_spec(cfg.sim)
    rotations = obtain_rotations(cfg, loaded, corpus, spec.online(), spec.weight_grid(), timings)
    if cfg.rotate in LEARNED_KINDS and cfg.rotations_path is None:
        rotations = _save_learned(rotations, rotations_artefact_path(output, directory=True))
    sim = quantize_simulated(cfg, loaded, corpus, probe, rotations, spec, timings)
    graph = graph_config(spec)
    metadata = {"respin.version": __version__, "respin.rotate": cfg.rotate, **sim_metadata(spec),
                "respin.calibration.sha256": corpus.calibration_sha256}
    with timings.stage("export"):
        written = write_onnx_folder(output, loaded, sim.model, sim.qmodel, graph, sim.corrections, metadata, cfg.force)
    report = {
        "tool": "respin-export", "version": __version__, "command": "convert", "output": str(output),
        "source": loaded.source.describe(), "file_bytes": written["model_bytes"], "files": written["files"],
        "genai_config": written["genai_config"],
        "config": {"to": "onnx", "rotate": cfg.rotate, "seed": cfg.seed, "sim": spec.describe(),
                   "graph": {"abits": graph.act.bits, "kv_bits": graph.kv_bits, "r3": graph.r3, "r4": graph.r4}},
        "rotations": None if rotations is None else rotations.describe(),
        "invariance": sim.invariance.describe(), "rank": sim.rank,
        "online_macs_per_token": sim.online_macs_per_token, "model_macs_per_token": model_macs_per_token(loaded),
        "corpus": corpus.describe(),
    }
    if cfg.rotate in LEARNED_KINDS:
        report["rotations_file"] = str(cfg.rotations_path or rotations_artefact_path(output, directory=True))
    if cfg.validation is not None:
        with timings.stage("validate"):
            segments = evaluation_tokens(loaded.tokenizer, corpus.evaluation, cfg.validation.ctx, cfg.validation.tokens)
            report["validation"] = validate_onnx(output, sim.model, loaded.model, segments)
    return report


def validate_onnx(folder: Path, reference: torch.nn.Module, fp_model: torch.nn.Module | None,
                  segments: torch.Tensor, threads: int | None = None) -> dict:
    """PPL of FP / the simulated-quant reference / onnxruntime, and torch ↔ onnxruntime parity
    (function bodies; our kernels too when the library is built)."""
    from converter.onnx_runtime import OnnxDecoder, uses_custom_ops

    runtimes = {"functions": OnnxDecoder(folder, use_kernels=False, threads=threads)}
    kernels_note = None
    if uses_custom_ops(folder):
        from runtime_ops.library import available

        if available():
            runtimes["kernels"] = OnnxDecoder(folder, use_kernels=True, threads=threads)
        else:
            kernels_note = "kernel library not built (python -m runtime_ops.build): function bodies only"
    parity = runtime_parity(reference, runtimes, segments, "ONNX parity")
    result = {"tokens": int(segments.numel()), "ctx": int(segments.shape[1]),
              "reference_ppl": parity["functions"].ppl_reference,
              "parity": {name: p.describe() for name, p in parity.items()},
              # what a 1-ulp change of the input does to the torch model itself
              "noise_floor": noise_floor(reference, segments, "noise floor").describe()}
    if fp_model is not None:
        result["fp_ppl"] = perplexity(fp_model, segments).ppl
    if kernels_note:
        result["kernels"] = kernels_note
    return result
