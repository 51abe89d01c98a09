#!/usr/bin/env python
"""onnxruntime benchmark on SmolLM2 (CPU, 2 threads): FP32, onnxruntime's own int4 quantizer,
our W4A16 (MatMulNBits, Hadamard-rotated + GPTQ), W4A4KV4 (ReSpinQuant) with function bodies and
with our kernels — prefill and decode speed, peak RSS, file size, perplexity and parity — and the
online-op overhead (the same W4A4 model with its Hadamard/ResidualCorrection nodes removed).

Exports are made with the CLI (`respin-export --to onnx … --eval --report`, whose parity section
is the torch ↔ onnxruntime comparison) and cached in benchmarks/work/onnx_runtime/; every timing runs
in its own child process so its peak RSS is its own.
Results: benchmarks/results/onnx_runtime.{json,md}.

    pip install -e ".[bench]"                    # onnx-ir, which onnxruntime's int4 quantizer imports
    python benchmarks/onnx_runtime.py            # everything (about 40 min on 2 cores with cached rotations)
    python benchmarks/onnx_runtime.py --overhead-only            # re-measure the online-op overhead only
    python benchmarks/onnx_runtime.py --w4a4-only                # the W4A4KV4 rows and the overhead only
    python benchmarks/onnx_runtime.py --time DIR --kernels on   # one timing (used internally)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
WORK = HERE / "work" / "onnx_runtime"
RESULTS = HERE / "results"
THREADS = 2
PROMPT_TOKENS = 512
NEW_TOKENS = 128
EVAL_TOKENS = 4096
LEARNED_RESPIN = HERE / "work" / "rotation_quality" / "rotations" / "respin-W4A4KV4.safetensors"

EXPORTS = {  # folder → CLI arguments
    "fp32": ["--rotate", "none", "--wbits", "16"],
    "w4a16": ["--rotate", "hadamard", "--wbits", "4", "--abits", "16"],
    "w4a16-asym": ["--rotate", "hadamard", "--wbits", "4", "--abits", "16", "--asym"],
    "w4a4kv4": ["--rotate", "respin", "--wbits", "4", "--abits", "4", "--kvbits", "4"],
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def export(name: str) -> dict:
    """Export (once) and return the CLI's report."""
    folder, report = WORK / name, WORK / f"{name}.report.json"
    if report.is_file() and (folder / "model.onnx").is_file():
        return json.loads(report.read_text())
    args = list(EXPORTS[name])
    if name == "w4a4kv4" and LEARNED_RESPIN.is_file():
        args += ["--rotations", str(LEARNED_RESPIN)]  # trained by benchmarks/rotation_quality.py
    log(f"exporting {name}: respin-export --to onnx {' '.join(args)}")
    cmd = [sys.executable, "-m", "converter.cli", "--to", "onnx", *args, "-o", str(folder), "--force", "--eval",
           "--eval-tokens", str(EVAL_TOKENS), "--report", str(report)]
    subprocess.run(cmd, cwd=REPO, check=True)
    return json.loads(report.read_text())


def ort_int4(fp32: Path) -> Path:
    """onnxruntime's MatMulNBits quantizer (block 32, symmetric) applied to our FP32 export."""
    out = WORK / "ort_int4"
    if (out / "model.onnx").is_file():
        return out
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    log("quantizing the FP32 export with onnxruntime's MatMulNBitsQuantizer (block 32)")
    tmp = WORK / "ort_int4.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(fp32, tmp, ignore=shutil.ignore_patterns("model.onnx*"))
    quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32 / "model.onnx")), block_size=32, is_symmetric=True)
    quantizer.process()
    onnx.save_model(quantizer.model.model, str(tmp / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data")
    tmp.rename(out)
    return out


def strip_online_ops(folder: Path) -> Path:
    """The same model without its online ops (timing only): Hadamard nodes become Identity, the fused
    quantizers lose their Hadamard (hadamard = 0), ResidualCorrection + Z becomes the plain Add."""
    import onnx
    from onnx import helper

    from runtime_ops import functions

    out = WORK / f"{folder.name}-no-online"
    if (out / "model.onnx").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    nodes = []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.domain != "respin":
            pass
        elif node.op_type == "Hadamard":
            node = helper.make_node("Identity", [node.input[0]], list(node.output), name=node.name)
        elif node.op_type == "ResidualCorrection":
            inputs = [node.input[0], node.input[3]] if len(node.input) > 3 else [node.input[0]]
            node = helper.make_node("Add" if len(inputs) == 2 else "Identity", inputs, list(node.output), name=node.name)
        elif attrs.get("hadamard"):
            attrs.update(hadamard=0, hadamard_m=1)
            node = functions.make_node(node.op_type, list(node.input), list(node.output), name=node.name, **attrs)
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.functions[:]
    model.functions.extend(functions.function_protos(nodes))
    onnx.save_model(model, str(out / "model.onnx"))
    data = out / "model.onnx.data"
    if not data.exists():  # a hard link: onnxruntime refuses external data outside the model's folder
        os.link(folder / "model.onnx.data", data)
    return out


def timing(folder: Path, kernels: bool) -> dict:
    """Run `--time` in a child process: prefill tok/s, decode tok/s, peak RSS."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--time", str(folder), "--kernels", "on" if kernels else "off"]
    out = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


class PeakRSS:
    """Samples this process's RSS every 5 ms (ru_maxrss would include the parent's peak before exec)."""

    def __init__(self) -> None:
        import threading

        import psutil

        self.peak, self._proc, self._stop = 0, psutil.Process(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self._proc.memory_info().rss) / 2**20


def measure(folder: Path, kernels: bool) -> dict:
    from converter.onnx_runtime import OnnxDecoder

    rss = PeakRSS()
    decoder = OnnxDecoder(folder, use_kernels=kernels, threads=THREADS)
    rng = np.random.default_rng(0)
    prompt = rng.integers(100, 40000, (1, PROMPT_TOKENS))
    decoder.step(prompt[:, :16], decoder.empty_cache(1), 0)  # warm-up
    start = time.perf_counter()
    logits, past = decoder.step(prompt, decoder.empty_cache(1), 0)
    prefill = time.perf_counter() - start
    token, length = int(logits[0, -1].argmax()), PROMPT_TOKENS
    start = time.perf_counter()
    for _ in range(NEW_TOKENS):
        logits, past = decoder.step(np.asarray([[token]]), past, length)
        token, length = int(logits[0, -1].argmax()), length + 1
    decode = time.perf_counter() - start
    return {"prefill_tok_s": PROMPT_TOKENS / prefill, "decode_tok_s": NEW_TOKENS / decode,
            "peak_rss_mb": rss.stop()}


def file_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("model.onnx*")) / 1e6


def ort_int4_quality(folder: Path, reference: Path) -> dict:
    """PPL and parity of the onnxruntime-quantized model against our FP32 export (= the torch FP model
    within its measured parity) on the same evaluation segments as the CLI's --eval."""
    import torch

    from converter.data import CorpusConfig, evaluation_tokens, load_corpus
    from converter.onnx_runtime import OnnxDecoder
    from converter.parity import ParityAccumulator
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(reference))
    segments = evaluation_tokens(tokenizer, load_corpus(CorpusConfig()).evaluation, 512, EVAL_TOKENS)
    ref, run = OnnxDecoder(reference, threads=THREADS), OnnxDecoder(folder, threads=THREADS)
    acc = ParityAccumulator()
    for seg in segments:
        ids = seg[None].numpy()
        acc.add(torch.from_numpy(ref.logits(ids)[0]), torch.from_numpy(run.logits(ids)[0]), seg)
    return acc.result().describe()


OVERHEAD_ROUNDS = 128  # paired rounds of OVERHEAD_TOKENS decoded tokens each, with and without the online ops (per-round ratios scatter by tens of percent on this shared machine)
OVERHEAD_TOKENS = 32


def online_overhead(folder: Path, stripped: Path, kernels: bool) -> tuple[float, dict]:
    """Decode-time overhead of the online ops, measured in one process: both models decode the same
    OVERHEAD_TOKENS tokens from the same 512-token cache, alternately (which one goes first
    alternates too), OVERHEAD_ROUNDS times; the overhead is the median of the paired time ratios —
    this shared 2-core machine drifts by more than the effect between separate runs."""
    from converter.onnx_runtime import OnnxDecoder

    decoders = {"with": OnnxDecoder(folder, use_kernels=kernels, threads=THREADS),
                "without": OnnxDecoder(stripped, use_kernels=kernels, threads=THREADS)}
    prompt = np.random.default_rng(0).integers(100, 40000, (1, PROMPT_TOKENS))
    start = {}
    for name, decoder in decoders.items():
        logits, past = decoder.step(prompt, decoder.empty_cache(1), 0)
        start[name] = (int(logits[0, -1].argmax()), past)

    def decode(name: str) -> float:
        decoder, (token, past) = decoders[name], start[name]
        begin, length = time.perf_counter(), PROMPT_TOKENS
        for _ in range(OVERHEAD_TOKENS):
            logits, past = decoder.step(np.asarray([[token]]), past, length)
            token, length = int(logits[0, -1].argmax()), length + 1
        return time.perf_counter() - begin

    decode("with"), decode("without")  # warm-up
    times = {"with": [], "without": []}
    log(f"online overhead: {OVERHEAD_ROUNDS} paired rounds of {OVERHEAD_TOKENS} tokens")
    for i in range(OVERHEAD_ROUNDS):
        for name in (("with", "without") if i % 2 == 0 else ("without", "with")):
            times[name].append(decode(name))
    ratios = np.asarray([w / wo for w, wo in zip(times["with"], times["without"])])
    tok_s = {k: [round(OVERHEAD_TOKENS / t, 1) for t in v] for k, v in times.items()}
    return float(np.median(ratios)) - 1, {"decode_tok_s": tok_s, "ratio_min": round(float(ratios.min()) - 1, 4),
                                          "ratio_max": round(float(ratios.max()) - 1, 4),
                                          "ci95": [round(float(c) - 1, 4) for c in median_ci95(ratios)]}


def median_ci95(values: np.ndarray, resamples: int = 10000) -> tuple[float, float]:
    """95% bootstrap interval of the median (fixed seed: the same rounds give the same interval)."""
    rng = np.random.default_rng(0)
    medians = np.median(rng.choice(values, (resamples, len(values))), axis=1)
    return tuple(np.percentile(medians, [2.5, 97.5]))


def row(variant: str, folder: Path, kernels: bool, parity: dict) -> dict:
    log(f"timing {variant}")
    t = timing(folder, kernels)
    return {"variant": variant, **{k: round(v, 2) for k, v in t.items()}, "file_mb": round(file_mb(folder), 1),
            "ppl": parity["ppl_runtime"], "top1_agreement": parity["top1_agreement"],
            "max_abs_logit_err": parity["max_abs_logit_err"], "parity_reference": parity.get("reference", "")}


def run_all() -> dict:
    WORK.mkdir(parents=True, exist_ok=True)
    reports = {name: export(name) for name in EXPORTS}
    rows = []
    fp = reports["fp32"]["validation"]["parity"]["functions"]
    rows.append(row("fp32", WORK / "fp32", False, {**fp, "reference": "torch FP"}))
    int4 = ort_int4(WORK / "fp32")
    rows.append(row("ort-int4-block32", int4, False, {**ort_int4_quality(int4, WORK / "fp32"),
                                                     "reference": "our FP32 ONNX"}))
    w4a16 = reports["w4a16"]["validation"]["parity"]["functions"]
    rows.append(row("w4a16-matmulnbits", WORK / "w4a16", False, {**w4a16, "reference": "torch W4A16"}))
    asym = reports["w4a16-asym"]["validation"]["parity"]["functions"]
    rows.append(row("w4a16-matmulnbits-asym", WORK / "w4a16-asym", False, {**asym, "reference": "torch W4A16 (zero points)"}))
    rows += w4a4_rows(reports["w4a4kv4"])
    return {**w4a4_overhead(rows), "threads": THREADS, "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS,
            "eval_tokens": EVAL_TOKENS, "fp_ppl": reports["w4a16"]["validation"].get("fp_ppl"), "rows": rows}


def w4a4_rows(report: dict) -> list[dict]:
    """The W4A4KV4 export timed with its function bodies and (when built) with our kernels."""
    parity = report["validation"]["parity"]
    reference = "torch simulated W4A4KV4"
    rows = [row("w4a4kv4-functions", WORK / "w4a4kv4", False, {**parity["functions"], "reference": reference})]
    if "kernels" in parity:
        rows.append(row("w4a4kv4-kernels", WORK / "w4a4kv4", True, {**parity["kernels"], "reference": reference}))
    return rows


def w4a4_overhead(rows: list[dict]) -> dict:
    """The online-op overhead of the W4A4KV4 export, in the runtime of its last row."""
    with_online = next(r for r in reversed(rows) if r["variant"].startswith("w4a4kv4"))
    kernels = with_online["variant"].endswith("kernels")
    overhead, detail = online_overhead(WORK / "w4a4kv4", strip_online_ops(WORK / "w4a4kv4"), kernels)
    return {"online_overhead": round(overhead, 4), "online_overhead_runtime": with_online["variant"],
            "online_overhead_detail": detail, "online_overhead_rounds": OVERHEAD_ROUNDS}


def markdown(result: dict) -> str:
    lines = [f"SmolLM2-135M, onnxruntime CPU, {result['threads']} threads; prefill = one {result['prompt_tokens']}-token "
             f"prompt, decode = {result['new_tokens']} greedy tokens with the KV cache; PPL on {result['eval_tokens']} "
             f"evaluation tokens (ctx 512; torch FP {result['fp_ppl']:.3f}); parity vs the reference named.", "",
             "| variant | prefill tok/s | decode tok/s | peak RSS MB | file MB | PPL | top-1 | max abs Δlogit | parity reference |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['variant']} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['file_mb']:.1f} | {r['ppl']:.3f} | {r['top1_agreement'] * 100:.2f}% | "
                     f"{r['max_abs_logit_err']:.2e} | {r['parity_reference']} |")
    lines += ["", f"Online-op overhead (R3 on Q; R3 on K, R4 and the skip corrections fused into QuantizeKV, "
              f"DynamicQuantize and the residual adds; {result['online_overhead_runtime']}): "
              f"{result['online_overhead'] * 100:+.1f}% decode time (median of {result['online_overhead_rounds']} "
              f"paired rounds of {OVERHEAD_TOKENS} tokens in one process; per-round ratios from "
              f"{result['online_overhead_detail']['ratio_min'] * 100:+.1f}% to "
              f"{result['online_overhead_detail']['ratio_max'] * 100:+.1f}%" + _ci_text(result) + ")."]
    return "\n".join(lines) + "\n"


def _ci_text(result: dict) -> str:
    ci = result["online_overhead_detail"].get("ci95")  # absent in results of the earlier method
    return f"; 95% bootstrap interval of the median {ci[0] * 100:+.1f}% … {ci[1] * 100:+.1f}%" if ci else ""


def rerun_w4a4(rows_too: bool) -> dict:
    """Re-measure the W4A4KV4 export's online-op overhead (and, with rows_too, its rows: after new
    rotations), keeping the other rows of the last full run (benchmarks/results/onnx_runtime.json)."""
    result = json.loads((RESULTS / "onnx_runtime.json").read_text())
    WORK.mkdir(parents=True, exist_ok=True)
    report = export("w4a4kv4")
    rows = result["rows"]
    if rows_too:
        rows = [r for r in rows if not r["variant"].startswith("w4a4kv4")] + w4a4_rows(report)
    for key in ("online_overhead_decode_tok_s", "online_overhead_repeats"):  # the earlier method's fields
        result.pop(key, None)
    return {**result, **w4a4_overhead(rows), "rows": rows}


@click.command()
@click.option("--time", "time_dir", type=click.Path(path_type=Path), default=None)
@click.option("--kernels", type=click.Choice(["on", "off"]), default="off")
@click.option("--overhead-only", is_flag=True, help="re-measure only the online-op overhead (other rows kept)")
@click.option("--w4a4-only", is_flag=True, help="re-measure the W4A4KV4 rows and the overhead (other rows kept; "
              "delete benchmarks/work/onnx_runtime/w4a4kv4* first to re-export with new rotations)")
def main(time_dir, kernels, overhead_only, w4a4_only):
    if time_dir is not None:
        print(json.dumps(measure(time_dir, kernels == "on")))
        return
    result = rerun_w4a4(w4a4_only) if overhead_only or w4a4_only else run_all()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "onnx_runtime.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "onnx_runtime.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
    main()
