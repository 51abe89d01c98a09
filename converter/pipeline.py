"""The whole conversion: load → canonicalize → rotate (+ invariance gate) → quantize → export → validate.

Every stage is a plain function elsewhere; this module only orchestrates them and records the
report. The CLI builds a `ConvertConfig` and calls `convert`.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from converter import __version__
from converter.data import CorpusConfig, calibration_batches, evaluation_tokens, load_corpus
from converter.errors import RespinError
from converter.export_gguf import GGUFExportConfig, write_gguf
from converter.invariance import check_invariance, model_logits
from converter.loading import LoadedModel, load_model
from converter.quantization.calibrate import QuantConfig, QuantizedModel, load_quantized_weights, quantize_model
from converter.report import Timings, peak_rss_mb, versions, write_json_atomic
from converter.validation import ValidationConfig, validate_gguf
from rotations.fusion import apply_rotations, fold_norms
from rotations.rotations import Rotations, make_rotations

logger = logging.getLogger(__name__)

EXPORT_TARGETS = ("gguf",)
# llama.cpp has no online ops: only rotations fully fused into the weights can go to GGUF.
GGUF_ROTATIONS = ("none", "hadamard")


@dataclass(frozen=True)
class ConvertConfig:
    output: Path
    model: str | None = None  # None: the bundled SmolLM2-135M
    to: str = "gguf"
    rotate: str = "hadamard"
    quant: QuantConfig = field(default_factory=QuantConfig)
    seed: int = 0
    calib_samples: int = 64
    calib_seq_len: int = 512
    probe_tokens: int = 128  # tokens the invariance gate compares
    force: bool = False
    validation: ValidationConfig | None = None  # None: no evaluation after export
    corpus: CorpusConfig = field(default_factory=CorpusConfig)

    def __post_init__(self) -> None:
        if self.to not in EXPORT_TARGETS:
            raise RespinError(f"unknown export target '{self.to}': supported are {', '.join(EXPORT_TARGETS)}")
        if self.rotate == "respin" and self.to == "gguf":
            raise RespinError("--rotate respin cannot export to GGUF: llama.cpp cannot run ReSpinQuant's online "
                              "skip-path corrections; use --to onnx, or --rotate none|hadamard for GGUF")
        if self.rotate not in GGUF_ROTATIONS:
            raise RespinError(f"unknown rotation '{self.rotate}' for GGUF: supported are {', '.join(GGUF_ROTATIONS)}")
        if self.calib_samples < 1 or self.calib_seq_len < 2:
            raise RespinError("calibration needs at least 1 sample of at least 2 tokens")


def check_output(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise RespinError(f"output {path} exists: pass --force to overwrite")
    if path.is_dir():
        raise RespinError(f"output {path} is a directory: give a file name ending in .gguf")
    path.parent.mkdir(parents=True, exist_ok=True)


def rotate_model(loaded: LoadedModel, rotations: Rotations | None) -> torch.nn.Module:
    """A canonicalized (folded, untied) copy of the model with `rotations` fused — in float64, cast back once."""
    dtype = next(loaded.model.parameters()).dtype
    fused = copy.deepcopy(loaded.model).to(torch.float64)
    fold_norms(fused)
    if rotations is not None:
        apply_rotations(fused, rotations, loaded.shape)
    return fused.to(dtype)


def convert(cfg: ConvertConfig) -> dict:
    """Run the conversion; returns the report (also written by the CLI with --report)."""
    output = Path(cfg.output)
    check_output(output, cfg.force)
    timings = Timings()
    with timings.stage("load"):
        loaded = load_model(cfg.model)
    with timings.stage("corpus"):
        corpus = load_corpus(cfg.corpus)
        probe = evaluation_tokens(loaded.tokenizer, corpus.calibration, cfg.probe_tokens, cfg.probe_tokens)
    with timings.stage("rotate"):
        reference_logits = model_logits(loaded.model, probe)
        rotations = make_rotations(cfg.rotate, loaded.shape, cfg.seed)
        fused = rotate_model(loaded, rotations)
        invariance = check_invariance(reference_logits, fused, probe, what=f"{cfg.rotate}-rotated model")
        del reference_logits
    calibration = None
    with timings.stage("quantize"):
        if cfg.quant.needs_calibration:
            calibration = calibration_batches(loaded.tokenizer, corpus.calibration, cfg.calib_samples,
                                              cfg.calib_seq_len, seed=cfg.seed)
        qmodel = quantize_model(fused, cfg.quant, calibration)
    with timings.stage("export"):
        provenance = _provenance(cfg, rotations, qmodel, corpus)
        write_gguf(fused, qmodel, loaded.adapter, loaded.shape, loaded.source, output,
                   GGUFExportConfig(name=_model_name(loaded), provenance=provenance))
    report = {
        "tool": "respin-export", "version": __version__, "command": "convert",
        "source": loaded.source.describe(), "output": str(output), "file_bytes": output.stat().st_size,
        "config": {"to": cfg.to, "rotate": cfg.rotate, "seed": cfg.seed, "quant": cfg.quant.describe(),
                   "calib_samples": cfg.calib_samples, "calib_seq_len": cfg.calib_seq_len},
        "rotations": None if rotations is None else rotations.describe(),
        "invariance": invariance.describe(),
        "corpus": corpus.describe(),
        "provenance": provenance,
    }
    if cfg.validation is not None:
        with timings.stage("validate"):
            quantized = copy.deepcopy(fused)
            load_quantized_weights(quantized, qmodel)
            segments = evaluation_tokens(loaded.tokenizer, corpus.evaluation, cfg.validation.ctx, cfg.validation.tokens)
            report["validation"] = validate_gguf(loaded.model, quantized, output, segments, cfg.validation)
    report["timings_s"] = timings.seconds
    report["convert_s"] = round(sum(v for k, v in timings.seconds.items() if k != "validate"), 3)
    report["peak_rss_mb"] = round(peak_rss_mb(), 1)
    report["versions"] = versions()
    return report


def _model_name(loaded: LoadedModel) -> str:
    name = getattr(loaded.model.config, "_name_or_path", "") or loaded.source.path.stem
    return f"{name} (respin-export)"


def _provenance(cfg: ConvertConfig, rotations: Rotations | None, qmodel: QuantizedModel, corpus) -> dict:
    q = cfg.quant
    prov = {
        "rotation.kind": cfg.rotate,
        "rotation.seed": cfg.seed,
        "quant.method": q.method if q.quantizes else "none",
        "quant.wtype": q.wtype,
        "quant.head_type": q.head_type,
        "quant.group_size": 32,
        "calibration.text": f"{corpus.source} (calibration split: {corpus.rule})",
        "calibration.sha256": corpus.calibration_sha256,
        "calibration.tokens": qmodel.n_calibration_tokens,
    }
    if rotations is not None:
        prov.update({f"rotation.{k}": v for k, v in rotations.notes.items()})
    if q.needs_calibration:
        prov.update({"gptq.damp": q.gptq.percdamp, "gptq.act_order": q.gptq.act_order,
                     "gptq.clip_search": q.gptq.clip_search, "gptq.block_size": q.gptq.block_size})
    return prov


def write_report(report: dict, path: Path) -> None:
    write_json_atomic(path, report)
