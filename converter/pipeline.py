"""The whole conversion: load → canonicalize → rotate (+ invariance gate) → quantize → export → validate.

Every stage is a plain function elsewhere; this module only orchestrates them and records the
report. The CLI builds a `ConvertConfig` and calls `convert`.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from converter import __version__, gguf_mixture
from converter.data import CorpusConfig, calibration_batches, evaluation_tokens, load_corpus
from converter.errors import RespinError
from converter.export_gguf import GGUFExportConfig, write_gguf
from converter.invariance import check_invariance, model_logits
from converter.loading import LoadedModel, load_model
from converter.quantization.calibrate import QuantConfig, QuantizedModel, load_quantized_weights, quantize_model
from converter.report import Timings, peak_rss_mb, versions, write_json_atomic
from converter.parity import perplexity
from converter.quantization.gptq import GPTQConfig
from converter.quantization.grids import grid
from converter.simquant import SimSpec, build_simquant, canonical_model, learn_rotations, model_macs_per_token
from converter.validation import ValidationConfig, validate_gguf
from rotations.online import SimQuantConfig
from rotations.rotations import LEARNED_KINDS, ROTATION_KINDS, Rotations, make_rotations
from rotations.training import TrainConfig

logger = logging.getLogger(__name__)

EXPORT_TARGETS = ("gguf", "onnx", "rotations")


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
    # learned rotations (spinquant / respin)
    rotations_path: Path | None = None  # re-apply saved rotations (ours or SpinQuant's R.bin) instead of training
    train: TrainConfig = field(default_factory=TrainConfig)
    train_samples: int = 64  # calibration segments the rotations are trained on
    checkpoint: Path | None = None  # None: next to the output
    resume: bool = False
    sim: SimSpec = field(default_factory=SimSpec)  # --to rotations: the simulated W·A·KV model
    tensor_type_overrides: tuple[tuple[str, str], ...] = ()  # GGUF: (regex on GGUF names, GGML type), first match wins

    def __post_init__(self) -> None:
        if self.to not in EXPORT_TARGETS:
            raise RespinError(f"unknown export target '{self.to}': supported are {', '.join(EXPORT_TARGETS)}")
        if self.rotate not in ROTATION_KINDS:
            raise RespinError(f"unknown rotation '{self.rotate}': supported are {', '.join(ROTATION_KINDS)}")
        if self.rotate == "respin" and self.to == "gguf":
            raise RespinError("--rotate respin cannot export to GGUF: llama.cpp cannot run ReSpinQuant's online "
                              "skip-path corrections; use --to rotations (simulated W4A4 model + rotations file), "
                              "or --rotate none|hadamard|spinquant for GGUF")
        if self.to == "gguf" and (self.sim.abits < 16 or self.sim.kvbits < 16):
            raise RespinError("GGUF export is weight-only: --abits/--kvbits apply to --to rotations "
                              "(llama.cpp's KV cache type is --kv-type)")
        if self.calib_samples < 1 or self.calib_seq_len < 2 or self.train_samples < 1:
            raise RespinError("calibration needs at least 1 sample of at least 2 tokens")
        if self.to == "onnx" and Path(self.output).suffix in (".onnx", ".gguf", ".safetensors"):
            raise RespinError(f"--to onnx writes a directory (model.onnx, its weights, tokenizer, genai_config.json): "
                              f"give a directory, not {Path(self.output).name}")
        if self.to == "rotations" and Path(self.output).suffix != ".safetensors":
            raise RespinError(f"--to rotations writes a .safetensors rotations file (got {Path(self.output).name})")
        if self.resume and (self.checkpoint is None or not Path(self.checkpoint).is_file()):
            raise RespinError(f"--resume: no checkpoint at {self.checkpoint}")
        if self.tensor_type_overrides and self.to != "gguf":
            raise RespinError("--tensor-type applies to --to gguf")
        if self.resume and self.rotations_path is not None:
            raise RespinError("--resume continues training; --rotations re-applies finished rotations: pick one")


def check_output(path: Path, force: bool, directory: bool = False) -> None:
    if directory:
        from converter.onnx_folder import check_output_dir

        return check_output_dir(path, force)
    if path.exists() and not force:
        raise RespinError(f"output {path} exists: pass --force to overwrite")
    if path.is_dir():
        raise RespinError(f"output {path} is a directory: give a file name")
    path.parent.mkdir(parents=True, exist_ok=True)


def rotations_artefact_path(output: Path, directory: bool = False) -> Path:
    """Where learned rotations are saved next to an export (the output itself for --to rotations)."""
    if directory:  # beside the ONNX folder, which is replaced as a whole
        return output.parent / f"{output.name}.rotations.safetensors"
    return output if output.suffix == ".safetensors" else output.with_suffix(".rotations.safetensors")


def obtain_rotations(cfg: ConvertConfig, loaded: LoadedModel, corpus, online: SimQuantConfig,
                     weight_grid, timings: Timings) -> Rotations | None:
    """Saved rotations (--rotations), learned ones (spinquant/respin: trained, checkpointed), or built ones."""
    if cfg.rotations_path is not None:
        rotations = Rotations.load(cfg.rotations_path)
        rotations.check_shape(loaded.shape)
        if cfg.rotate in LEARNED_KINDS and rotations.per_block != (cfg.rotate == "respin"):
            raise RespinError(f"{cfg.rotations_path} holds {rotations.kind} rotations, not {cfg.rotate}")
        return rotations
    if cfg.rotate not in LEARNED_KINDS:
        return make_rotations(cfg.rotate, loaded.shape, cfg.seed)
    train = replace(cfg.train, kind=cfg.rotate, seed=cfg.seed)
    checkpoint = cfg.checkpoint or Path(cfg.output).with_suffix(".rotations.ckpt")
    with timings.stage("train_rotations"):
        segments = calibration_batches(loaded.tokenizer, corpus.calibration, cfg.train_samples, train.seq_len,
                                       seed=cfg.seed + 1)
        return learn_rotations(loaded, train, online, weight_grid, segments, checkpoint, cfg.resume)


def training_grid(quant: QuantConfig):
    """The weight grid learned rotations are trained for (with RTN-quantized weights): the file's
    grid, or for a llama.cpp mixture the 32-block grid of its main precision (K-quants need rows
    that are multiples of 256, which not every model has)."""
    if not quant.quantizes:
        return None
    if gguf_mixture.is_mixture(quant.wtype):
        return grid(gguf_mixture.TRAINING_GRIDS[quant.wtype[:2].lower()])
    return grid(quant.wtype)


def rotate_model(loaded: LoadedModel, rotations: Rotations | None) -> torch.nn.Module:
    """A canonicalized (folded, untied) copy with `rotations` fused (float64 inside): the GGUF's model."""
    return canonical_model(loaded, rotations, r4=False)


def convert(cfg: ConvertConfig) -> dict:
    """Run the conversion; returns the report (also written by the CLI with --report)."""
    output = Path(cfg.output)
    check_output(output, cfg.force, directory=cfg.to == "onnx")
    timings = Timings()
    with timings.stage("load"):
        loaded = load_model(cfg.model)
    with timings.stage("corpus"):
        corpus = load_corpus(cfg.corpus)
        probe = evaluation_tokens(loaded.tokenizer, corpus.calibration, cfg.probe_tokens, cfg.probe_tokens)
    if cfg.to == "rotations":
        return simulate(cfg, loaded, corpus, probe, timings)
    if cfg.to == "onnx":
        from converter.pipeline_onnx import export_onnx

        return _finish(export_onnx(cfg, loaded, corpus, probe, timings), timings)
    # GGUF is weight-only and llama.cpp has no online R3/R4: rotations are trained for W-RTN on the file's grid
    online = SimQuantConfig.from_bits(16, 16, r3=False, r4=False)
    rotations = obtain_rotations(cfg, loaded, corpus, online, training_grid(cfg.quant), timings)
    if rotations is not None and rotations.per_block:
        raise RespinError("per-block (ReSpinQuant) rotations cannot be fused into a GGUF file")
    if cfg.rotate in LEARNED_KINDS and cfg.rotations_path is None:
        rotations = _save_learned(rotations, rotations_artefact_path(output))
    with timings.stage("rotate"):
        reference_logits = model_logits(loaded.model, probe)
        fused = rotate_model(loaded, rotations)
        invariance = check_invariance(reference_logits, fused, probe, what=f"{cfg.rotate}-rotated model")
        del reference_logits
    cfg = replace(cfg, quant=gguf_mixture.resolve(cfg.quant, fused, loaded.shape, cfg.tensor_type_overrides))
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
    if cfg.rotate in LEARNED_KINDS:
        report["rotations_file"] = str(cfg.rotations_path or rotations_artefact_path(output))
    return _finish(report, timings)


def _save_learned(rotations: Rotations, path: Path) -> Rotations:
    """Save learned rotations; return them as the file gives them back (what this run must use)."""
    rotations.save(path)
    return rotations.as_stored()


def _finish(report: dict, timings: Timings) -> dict:
    report["timings_s"] = timings.seconds
    report["convert_s"] = round(sum(v for k, v in timings.seconds.items() if k != "validate"), 3)
    report["peak_rss_mb"] = round(peak_rss_mb(), 1)
    report["versions"] = versions()
    return report


def simulate(cfg: ConvertConfig, loaded: LoadedModel, corpus, probe: torch.Tensor, timings: Timings) -> dict:
    """--to rotations: learn/build the rotations, save them, build the simulated W·A·KV model, evaluate it."""
    output = Path(cfg.output)
    spec = cfg.sim
    rotations = obtain_rotations(cfg, loaded, corpus, spec.online(), spec.weight_grid(), timings)
    if rotations is None:
        raise RespinError("--to rotations needs a rotation: --rotate hadamard|spinquant|respin")
    to_save = replace(rotations, config={**rotations.config, "sim": spec.describe()})
    # the run uses exactly what the file gives back, so --rotations PATH reproduces it
    rotations = to_save if cfg.rotations_path is not None else to_save.as_stored()
    sim = quantize_simulated(cfg, loaded, corpus, probe, rotations, spec, timings)
    with timings.stage("export"):
        to_save.save(output)
    report = {
        "tool": "respin-export", "version": __version__, "command": "convert", "output": str(output),
        "source": loaded.source.describe(), "file_bytes": output.stat().st_size,
        "config": {"to": cfg.to, "rotate": cfg.rotate, "seed": cfg.seed, "sim": spec.describe(),
                   "train": None if cfg.rotate not in LEARNED_KINDS else vars(cfg.train)},
        "rotations": rotations.describe(), "invariance": sim.invariance.describe(),
        "rank": sim.rank, "correction_fp_max_abs_logit_err": sim.correction_fp_err,
        "online_macs_per_token": sim.online_macs_per_token, "model_macs_per_token": model_macs_per_token(loaded),
        "corpus": corpus.describe(),
    }
    if cfg.validation is not None:
        with timings.stage("validate"):
            segments = evaluation_tokens(loaded.tokenizer, corpus.evaluation, cfg.validation.ctx, cfg.validation.tokens)
            ppl, tokens = sim.perplexity(segments)
            fp = perplexity(loaded.model, segments)
            report["validation"] = {"tokens": tokens, "ctx": cfg.validation.ctx, "fp_ppl": fp.ppl, "sim_ppl": ppl}
    return _finish(report, timings)


def quantize_simulated(cfg: ConvertConfig, loaded: LoadedModel, corpus, probe: torch.Tensor,
                       rotations: Rotations | None, spec: SimSpec, timings: Timings):
    """The simulated W·A·KV model of `spec` with GPTQ (calibrated here) or RTN weights."""
    calibration = None
    with timings.stage("quantize"):
        if spec.wquant == "gptq" and spec.wbits < 16:
            calibration = calibration_batches(loaded.tokenizer, corpus.calibration, cfg.calib_samples,
                                              cfg.calib_seq_len, seed=cfg.seed)
        gptq = cfg.quant.gptq
        return build_simquant(loaded, rotations, spec, probe, calibration,
                              GPTQConfig(gptq.percdamp, act_order=gptq.act_order, clip_search=gptq.clip_search))


def _model_name(loaded: LoadedModel) -> str:
    name = getattr(loaded.model.config, "_name_or_path", "") or loaded.source.path.stem
    return f"{name} (respin-export)"


def _provenance(cfg: ConvertConfig, rotations: Rotations | None, qmodel: QuantizedModel, corpus) -> dict:
    q = cfg.quant
    prov = {
        "rotation.kind": cfg.rotate,
        "rotation.seed": cfg.seed,
        "rotation.source": str(cfg.rotations_path.name) if cfg.rotations_path else "built",
        "quant.method": q.method if q.quantizes else "none",
        "quant.wtype": q.wtype,
        # a mixture types the head and embedding by llama-quantize's rules (--head-type is ignored)
        "quant.head_type": "mixture" if gguf_mixture.is_mixture(q.wtype) else q.head_type,
        "quant.group_size": "mixture" if q.tensor_grids else 32,
        "calibration.text": f"{corpus.source} (calibration split: {corpus.rule})",
        "calibration.sha256": corpus.calibration_sha256,
        "calibration.tokens": qmodel.n_calibration_tokens,
    }
    if rotations is not None:
        prov.update({f"rotation.{k}": v for k, v in rotations.notes.items()})
        train = rotations.config.get("train")
        if train:
            prov.update({f"rotation.train.{k}": train[k] for k in ("steps", "lr", "batch_size", "seq_len")})
    if q.needs_calibration:
        prov.update({"gptq.damp": q.gptq.percdamp, "gptq.act_order": q.gptq.act_order,
                     "gptq.clip_search": q.gptq.clip_search, "gptq.block_size": q.gptq.block_size})
    return prov


def write_report(report: dict, path: Path) -> None:
    write_json_atomic(path, report)
