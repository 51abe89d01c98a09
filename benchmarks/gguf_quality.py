#!/usr/bin/env python
"""GGUF quality benchmark: our rotated/GPTQ files vs llama.cpp's own quantizations, measured in llama.cpp.

Every file is scored by llama.cpp's `llama-perplexity` on the same evaluation tokens: perplexity and
mean KL divergence against the logits of the F32 GGUF we write (the FP reference). The llama.cpp
tools are built from the source vendored in the pinned llama-cpp-python sdist
(`benchmarks/build_llama_tools.sh`).

Rows:
  - FP reference: our F32 GGUF (untied head; the FP function of the bundled model);
  - llama.cpp's own Q4_0, Q4_1, Q4_K_M and Q4_K_M + imatrix (llama-quantize of that same F32 file);
  - ours: {RTN, GPTQ} x {no rotation, Hadamard} x {Q4_0, Q4_1}, and Q4_0 GPTQ with learned SpinQuant R1/R2.

Everything lives in benchmarks/work/ (git-ignored) and each finished step is cached there, so an
interrupted run continues where it stopped. Results: benchmarks/results/gguf_quality.{json,md}.

    python benchmarks/gguf_quality.py                    # build tools if needed, run everything
    python benchmarks/gguf_quality.py --only "llama.cpp Q4_0" ours-q4_0-gptq-hadamard
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / "work"
RESULTS = HERE / "results"
BUILD_SCRIPT = HERE / "build_llama_tools.sh"
CACHE_VERSION = 2  # bump when a cached measurement's meaning changes


# --- rows -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    """One benchmarked GGUF file and how it is made."""

    slug: str  # file stem and cache key
    name: str  # row name in the table
    kind: str  # "fp" | "ours" | "llama.cpp"
    wtype: str
    rotate: str = "none"
    quant: str = "none"
    imatrix: bool = False
    cli_args: tuple[str, ...] = field(default=())

    @property
    def gguf(self) -> Path:
        return WORK / "models" / f"{self.slug}.gguf"


FP = Spec("f32", "FP32 reference (our F32 GGUF)", "fp", "f32", cli_args=("--wtype", "f32", "--rotate", "none"))


def all_specs() -> list[Spec]:
    specs = [FP]
    for ftype in ("Q4_0", "Q4_1", "Q4_K_M"):
        specs.append(Spec(f"llamacpp-{ftype.lower()}", f"llama.cpp {ftype}", "llama.cpp", ftype, quant="llama-quantize"))
    specs.append(Spec("llamacpp-q4_k_m-imatrix", "llama.cpp Q4_K_M+imatrix", "llama.cpp", "Q4_K_M",
                      quant="llama-quantize+imatrix", imatrix=True))
    for wtype in ("q4_0", "q4_1"):
        for quant in ("rtn", "gptq"):
            for rotate in ("none", "hadamard"):
                label = f"ours {wtype.upper()} {quant.upper()}" + ("+Hadamard" if rotate == "hadamard" else "")
                specs.append(Spec(f"ours-{wtype}-{quant}-{rotate}", label, "ours", wtype, rotate, quant,
                                  cli_args=("--wtype", wtype, "--rotate", rotate, "--quant", quant)))
    # learned R1/R2 (trained for Q4_0 RTN weights, the CLI's defaults), then GPTQ; the convert time includes training
    specs.append(Spec("ours-q4_0-gptq-spinquant", "ours Q4_0 GPTQ+SpinQuant", "ours", "q4_0", "spinquant", "gptq",
                      cli_args=("--wtype", "q4_0", "--rotate", "spinquant", "--quant", "gptq")))
    specs += kquant_specs()
    return specs


K_MIXTURES = ("Q4_K_M", "Q3_K_M", "Q2_K")  # issue 6: llama.cpp's mixtures, theirs vs ours tensor-type for tensor-type


def kquant_specs() -> list[Spec]:
    """llama.cpp's own K mixtures (with and without imatrix) and ours: GPTQ onto the same per-tensor
    grids, without rotation, with Hadamard R1/R2 and with learned SpinQuant R1/R2."""
    specs = []
    for ftype in K_MIXTURES:
        low = ftype.lower()
        if ftype != "Q4_K_M":  # Q4_K_M's llama.cpp rows are listed with the Q4 rows above
            specs.append(Spec(f"llamacpp-{low}", f"llama.cpp {ftype}", "llama.cpp", ftype, quant="llama-quantize"))
            specs.append(Spec(f"llamacpp-{low}-imatrix", f"llama.cpp {ftype}+imatrix", "llama.cpp", ftype,
                              quant="llama-quantize+imatrix", imatrix=True))
        for rotate, label in (("none", ""), ("hadamard", "+Hadamard"), ("spinquant", "+SpinQuant")):
            args = ("--wtype", low, "--rotate", rotate, "--quant", "gptq")
            if rotate == "spinquant" and ftype != K_MIXTURES[0]:
                # trained once (full-precision weights while training, as GPTQ follows: the same rotations
                # for every mixture), re-applied here; this row's convert time leaves the training out
                args += ("--rotations", str(WORK / "models" / f"ours-{K_MIXTURES[0].lower()}-gptq-spinquant.rotations.safetensors"))
            specs.append(Spec(f"ours-{low}-gptq-{rotate}", f"ours {ftype} GPTQ{label}", "ours", low, rotate, "gptq",
                              cli_args=args))
    return specs


def select_specs(only: tuple[str, ...]) -> list[Spec]:
    specs = all_specs()
    if not only:
        return specs
    wanted = {o.lower() for o in only}
    chosen = [s for s in specs if s.slug.lower() in wanted or s.name.lower() in wanted]
    known = {s.slug.lower() for s in specs} | {s.name.lower() for s in specs}
    unknown = sorted(wanted - known)
    if unknown:
        names = ", ".join(f"{s.slug} ({s.name})" for s in specs)
        raise click.BadParameter(f"unknown row(s) {unknown}; rows: {names}", param_hint="--only")
    return chosen


# --- small helpers ----------------------------------------------------------------------------

def log(msg: str) -> None:
    click.echo(f"[{time.strftime('%H:%M:%S')}] {msg}", err=True)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_key(path: Path) -> dict:
    """Identity of a file for cache validation (cheap: size + mtime)."""
    st = path.stat()
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


class NotCached(Exception):
    """--cached-only: a step that is not in the cache would have to run."""


CACHED_ONLY = False  # set by --cached-only: report what is cached, run nothing


def run_logged(cmd: list[str], log_path: Path, env: dict | None = None) -> tuple[str, float]:
    """Run `cmd`, tee its combined output to `log_path`; return (output, wall seconds). Raises on failure."""
    if CACHED_ONLY:
        raise NotCached(" ".join(str(c) for c in cmd[:2]))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log(f"$ {' '.join(str(c) for c in cmd)}")
    t0 = time.perf_counter()
    with open(log_path, "w") as fh:
        proc = subprocess.run([str(c) for c in cmd], stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    out = log_path.read_text(errors="replace")
    if proc.returncode != 0:
        tail = "\n".join(out.splitlines()[-25:])
        raise click.ClickException(f"command failed (exit {proc.returncode}), log {log_path}:\n{tail}")
    return out, wall


# --- llama.cpp tools --------------------------------------------------------------------------

def tool(bin_dir: Path, name: str) -> Path:
    path = bin_dir / name
    if not path.exists():
        raise click.ClickException(f"{path} missing: run benchmarks/build_llama_tools.sh (or drop --skip-build)")
    return path


def ensure_tools(build_dir: Path, skip_build: bool) -> Path:
    bin_dir = build_dir / "build" / "bin"
    if not skip_build:
        run_logged(["bash", BUILD_SCRIPT, build_dir], WORK / "logs" / "build_llama_tools.log")
    for name in ("llama-perplexity", "llama-quantize", "llama-imatrix"):
        tool(bin_dir, name)
    return bin_dir


def llama_build_info(text: str) -> str | None:
    m = re.search(r"build: (\d+ \(\w+\).*)$", text, re.MULTILINE)
    return m.group(1).strip() if m else None


def llama_version(build_dir: Path) -> dict:
    """What llama.cpp the tools are: the sdist they come from and the build-info CMake generated."""
    out = {"source": "vendor/llama.cpp of the llama-cpp-python "
                     f"{os.environ.get('LLAMA_CPP_PYTHON_VERSION', '0.3.36')} sdist"}
    info = build_dir / "build" / "common" / "build-info.cpp"
    if info.exists():
        for key, value in re.findall(r"(LLAMA_\w+) = \"?([^\";]*)\"?;", info.read_text()):
            out[key.lower()] = value
    return out


# --- texts ------------------------------------------------------------------------------------

def write_texts() -> dict:
    """Evaluation and calibration splits as files for llama.cpp; returns their paths and checksums."""
    from converter.data import load_corpus

    corpus = load_corpus()
    out = {"corpus": corpus.describe()}
    for split in ("evaluation", "calibration"):
        text = getattr(corpus, split)
        path = WORK / f"{split}.txt"
        data = text.encode("utf-8")
        if not path.exists() or path.read_bytes() != data:
            path.write_bytes(data)
        out[split] = {"path": str(path), "sha256": hashlib.sha256(data).hexdigest(), "chars": len(text)}
    return out


# --- making the files -------------------------------------------------------------------------

def report_path(spec: Spec) -> Path:
    return WORK / "reports" / f"{spec.slug}.json"


def export_ours(spec: Spec, calib_samples: int | None) -> dict:
    """Convert with respin-export (skipped when the file and its report exist); returns the report."""
    rpath = report_path(spec)
    report = read_json(rpath)
    if report is not None and spec.gguf.exists() and report.get("file_bytes") == spec.gguf.stat().st_size:
        return report
    cmd = ["respin-export", *spec.cli_args, "-o", spec.gguf, "--force", "--report", rpath]
    if calib_samples is not None and spec.quant == "gptq":
        cmd += ["--calib-samples", str(calib_samples)]
    spec.gguf.parent.mkdir(parents=True, exist_ok=True)
    run_logged(cmd, WORK / "logs" / f"{spec.slug}.convert.log")
    report = read_json(rpath)
    if report is None:
        raise click.ClickException(f"respin-export wrote no report at {rpath}")
    return report


def make_imatrix(bin_dir: Path, calibration: Path, chunks: int, ctx: int, threads: int) -> dict:
    """llama-imatrix on our calibration split, from the F32 file (cached)."""
    dat = WORK / "models" / f"imatrix-c{ctx}-k{chunks}.gguf"  # this llama.cpp writes imatrix files as GGUF
    meta_path = WORK / "reports" / f"imatrix-c{ctx}-k{chunks}.json"
    meta = read_json(meta_path)
    if meta is not None and dat.exists():
        return meta
    out, wall = run_logged([tool(bin_dir, "llama-imatrix"), "-m", FP.gguf, "-f", calibration, "-c", str(ctx),
                            "--chunks", str(chunks), "-t", str(threads), "-o", dat],
                           WORK / "logs" / f"imatrix-c{ctx}-k{chunks}.log")
    if not dat.exists():
        raise click.ClickException(f"llama-imatrix wrote no {dat}")
    meta = {"path": str(dat), "chunks": chunks, "ctx": ctx, "tokens": chunks * ctx, "wall_s": round(wall, 1),
            "source": "calibration split"}
    write_json(meta_path, meta)
    return meta


def quantize_llamacpp(spec: Spec, bin_dir: Path, imatrix: dict | None, threads: int) -> dict:
    """llama-quantize of the F32 file (cached); returns convert time (peak RSS via /usr/bin/time when present)."""
    meta_path = WORK / "reports" / f"{spec.slug}.json"
    meta = read_json(meta_path)
    if meta is not None and spec.gguf.exists() and meta.get("file_bytes") == spec.gguf.stat().st_size:
        return meta
    cmd = [tool(bin_dir, "llama-quantize")]
    if spec.imatrix:
        cmd += ["--imatrix", imatrix["path"]]
    cmd += [FP.gguf, spec.gguf, spec.wtype, str(threads)]
    timed = Path("/usr/bin/time").exists()
    if timed:
        cmd = ["/usr/bin/time", "-v", *cmd]
    spec.gguf.parent.mkdir(parents=True, exist_ok=True)
    out, wall = run_logged(cmd, WORK / "logs" / f"{spec.slug}.quantize.log")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", out) if timed else None
    meta = {"convert_s": round(wall, 3), "peak_rss_mb": round(int(rss.group(1)) / 1024, 1) if rss else None,
            "file_bytes": spec.gguf.stat().st_size,
            "imatrix": imatrix if spec.imatrix else None}
    write_json(meta_path, meta)
    return meta


# --- measuring --------------------------------------------------------------------------------

_FLOAT = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf)"


def parse_perplexity(text: str) -> dict:
    """PPL, KLD and speed from llama-perplexity's output (this llama.cpp version's wording)."""
    out: dict = {}
    m = re.search(r"calculating perplexity over (\d+) chunks, n_ctx=(\d+), batch_size=(\d+), n_seq=(\d+)", text)
    if m:
        out.update(chunks=int(m.group(1)), ctx=int(m.group(2)), batch=int(m.group(3)), n_seq=int(m.group(4)))
    m = re.search(r"Final estimate: PPL = " + _FLOAT + r" \+/- " + _FLOAT, text)
    if m:
        out.update(ppl=float(m.group(1)), ppl_err=float(m.group(2)))
    m = re.search(r"Mean PPL\(Q\)\s*:\s*" + _FLOAT + r"\s*±\s*" + _FLOAT, text)
    if m:
        out.update(ppl=float(m.group(1)), ppl_err=float(m.group(2)))
    m = re.search(r"Mean PPL\(base\)\s*:\s*" + _FLOAT, text)
    if m:
        out["ppl_base"] = float(m.group(1))
    m = re.search(r"Mean\s+KLD:\s*" + _FLOAT + r"\s*±\s*" + _FLOAT, text)
    if m:
        out.update(kld_mean=float(m.group(1)), kld_err=float(m.group(2)))
    m = re.search(r"Same top p:\s*" + _FLOAT, text)
    if m:
        out["same_top_p_pct"] = float(m.group(1))
    m = re.search(r"prompt eval time =\s*" + _FLOAT + r" ms /\s*(\d+) tokens.*?" + _FLOAT + r" tokens per second", text)
    if m:
        out.update(prompt_ms=float(m.group(1)), prompt_tokens=int(m.group(2)), tok_s=float(m.group(3)))
    return out


def perplexity(spec: Spec, bin_dir: Path, evaluation: dict, chunks: int, ctx: int, threads: int,
               kld_base: Path) -> dict:
    """llama-perplexity of one file (cached): the FP file saves the base logits, the others compare to them."""
    key = {"v": CACHE_VERSION, "chunks": chunks, "ctx": ctx, "threads": threads,
           "eval_sha256": evaluation["sha256"], "file": file_key(spec.gguf),
           "base": None if spec is FP else file_key(kld_base)}
    cache_path = WORK / "ppl" / f"{spec.slug}.c{ctx}-k{chunks}.json"
    cached = read_json(cache_path)
    if cached is not None and cached.get("key") == key and (spec is FP) == (not cached.get("kld_mean")):
        if spec is not FP or kld_base.exists():
            return cached
    cmd = [tool(bin_dir, "llama-perplexity"), "-m", spec.gguf, "-f", evaluation["path"], "-c", str(ctx),
           "--chunks", str(chunks), "-t", str(threads), "--kl-divergence-base", kld_base,
           "-lv", "4"]  # verbosity 4: library info logs too, i.e. the build and llama_perf_context_print timings
    if spec is not FP:
        cmd.append("--kl-divergence")
    text, wall = run_logged(cmd, WORK / "logs" / f"{spec.slug}.ppl.c{ctx}-k{chunks}.log")
    result = parse_perplexity(text)
    if "ppl" not in result or (spec is not FP and "kld_mean" not in result):
        raise click.ClickException(f"could not parse llama-perplexity output for {spec.slug}: "
                                   f"see {WORK / 'logs'}; parsed {result}")
    if spec is FP:
        key["base"] = None  # written by this very run
    result.update(key=key, wall_s=round(wall, 1), llama_build=llama_build_info(text))
    write_json(cache_path, result)
    return result


def bits_per_weight(path: Path) -> dict:
    """Bits per weight of all tensors, and of the body (without token_embd / output), plus tensor types."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    total_bits = total_n = body_bits = body_n = 0
    types: dict[str, dict[str, int]] = {"body": {}, "token_embd.weight": {}, "output.weight": {}}
    for t in reader.tensors:
        n, bits = int(t.n_elements), int(t.n_bytes) * 8
        total_bits += bits
        total_n += n
        group = t.name if t.name in ("token_embd.weight", "output.weight") else "body"
        types[group][t.tensor_type.name] = types[group].get(t.tensor_type.name, 0) + n
        if group == "body":
            body_bits += bits
            body_n += n
    return {"bpw": round(total_bits / total_n, 4), "bpw_body": round(body_bits / body_n, 4),
            "n_weights": total_n, "n_weights_body": body_n, "tensor_types": types}


# --- one row ----------------------------------------------------------------------------------

def build_row(spec: Spec, made: dict, ppl: dict, evaluation: dict, chunks: int, ctx: int) -> dict:
    bpw = bits_per_weight(spec.gguf)
    row = {
        "name": spec.name, "slug": spec.slug, "wtype": spec.wtype.lower(), "rotate": spec.rotate, "quant": spec.quant,
        "ppl": ppl["ppl"], "ppl_err": ppl.get("ppl_err"), "kld_mean": ppl.get("kld_mean", 0.0 if spec is FP else None),
        "kld_err": ppl.get("kld_err"), "same_top_p_pct": ppl.get("same_top_p_pct"),
        "bpw": bpw["bpw"], "bpw_body": bpw["bpw_body"],
        "tokens": chunks * ctx, "tokens_scored": chunks * (ctx - 1 - ctx // 2), "ctx": ctx,
        "file_bytes": spec.gguf.stat().st_size,
        "convert_s": made.get("convert_s"), "peak_rss_mb": made.get("peak_rss_mb"),
        "llama_cpp_tok_s": ppl.get("tok_s"),
        "tensor_types": bpw["tensor_types"],
    }
    if spec.kind == "ours" or spec is FP:
        row["calib_samples"] = made.get("config", {}).get("calib_samples") if spec.quant == "gptq" else None
    if spec.imatrix:
        row["imatrix"] = made.get("imatrix")
    write_json(WORK / "rows" / f"{spec.slug}.json", row)
    return row


# --- parity (torch <-> llama.cpp) from the CLI's own --eval -----------------------------------

PARITY_OF = "ours-q4_0-gptq-hadamard"  # the row whose conversion the parity run repeats with --eval
PARITY_SPEC = Spec("eval-ours-q4_0-gptq-hadamard", "parity run", "ours", "q4_0", "hadamard", "gptq",
                   cli_args=("--wtype", "q4_0", "--rotate", "hadamard", "--quant", "gptq"))


def parity_run(eval_tokens: int, calib_samples: int | None) -> dict:
    rpath = report_path(PARITY_SPEC)
    report = read_json(rpath)
    if report is None or "validation" not in report or not PARITY_SPEC.gguf.exists():
        cmd = ["respin-export", *PARITY_SPEC.cli_args, "-o", PARITY_SPEC.gguf, "--force", "--report", rpath,
               "--eval", "--eval-tokens", str(eval_tokens)]
        if calib_samples is not None:
            cmd += ["--calib-samples", str(calib_samples)]
        PARITY_SPEC.gguf.parent.mkdir(parents=True, exist_ok=True)
        run_logged(cmd, WORK / "logs" / f"{PARITY_SPEC.slug}.convert.log")
        report = read_json(rpath)
        if report is None or "validation" not in report:
            raise click.ClickException(f"respin-export --eval wrote no validation into {rpath}")
    return report


# --- output -----------------------------------------------------------------------------------

COLUMNS = [("name", "file"), ("bpw", "bpw"), ("bpw_body", "bpw body"), ("file_mb", "MB"), ("ppl", "PPL"),
           ("dppl", "ΔPPL"), ("kld_mean", "mean KLD"), ("tok_s", "pp tok/s"), ("convert_s", "convert s"),
           ("rss", "peak RSS MB")]


def cells(row: dict, fp_ppl: float) -> dict[str, str]:
    def f(v, fmt):
        return "—" if v is None else format(v, fmt)

    return {"name": row["name"], "bpw": f(row["bpw"], ".2f"), "bpw_body": f(row["bpw_body"], ".2f"),
            "file_mb": f(row["file_bytes"] / 1e6, ".1f"), "ppl": f(row["ppl"], ".3f"),
            "dppl": "—" if row["slug"] == "f32" else f"{100 * (row['ppl'] / fp_ppl - 1):+.2f}%",
            "kld_mean": f(row["kld_mean"], ".4f"), "tok_s": f(row["llama_cpp_tok_s"], ".0f"),
            "convert_s": f(row["convert_s"], ".1f"), "rss": f(row["peak_rss_mb"], ".0f")}


def markdown_table(rows: list[dict], fp_ppl: float) -> str:
    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |",
             "|" + "|".join(":---" if k == "name" else "---:" for k, _ in COLUMNS) + "|"]
    for row in rows:
        c = cells(row, fp_ppl)
        lines.append("| " + " | ".join(c[k] for k, _ in COLUMNS) + " |")
    return "\n".join(lines)


def print_table(rows: list[dict], fp_ppl: float) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain fallback
        click.echo(markdown_table(rows, fp_ppl))
        return
    table = Table(title="GGUF quality in llama.cpp (SmolLM2-135M)")
    for key, head in COLUMNS:
        table.add_column(head, justify="left" if key == "name" else "right")
    for row in rows:
        c = cells(row, fp_ppl)
        table.add_row(*(c[k] for k, _ in COLUMNS))
    Console(width=160).print(table)


def targets(rows: list[dict], fp_ppl: float) -> dict | None:
    """Our best Q4_0 vs llama.cpp's Q4_0: gap ratios for PPL and mean KLD (target ≤ 0.5 each)."""
    by_name = {r["name"]: r for r in rows}
    base = by_name.get("llama.cpp Q4_0")
    ours = [r for r in rows if r["slug"].startswith("ours-q4_0")]
    if base is None or not ours:
        return None
    best_ppl = min(ours, key=lambda r: r["ppl"])
    best_kld = min(ours, key=lambda r: r["kld_mean"])
    ppl_ratio = (best_ppl["ppl"] - fp_ppl) / (base["ppl"] - fp_ppl)
    kld_ratio = best_kld["kld_mean"] / base["kld_mean"]
    out = {"llama.cpp Q4_0": {"ppl_gap": round(base["ppl"] - fp_ppl, 4), "kld_mean": base["kld_mean"]},
           "best_ours_ppl": {"name": best_ppl["name"], "ppl_gap": round(best_ppl["ppl"] - fp_ppl, 4)},
           "best_ours_kld": {"name": best_kld["name"], "kld_mean": best_kld["kld_mean"]},
           "ppl_gap_ratio": round(ppl_ratio, 4), "kld_ratio": round(kld_ratio, 4), "target_ratio": 0.5,
           "ppl_target_met": ppl_ratio <= 0.5, "kld_target_met": kld_ratio <= 0.5}
    k = by_name.get("llama.cpp Q4_K_M+imatrix")
    if k is not None:
        out["vs_q4_k_m_imatrix"] = {"ppl": k["ppl"], "kld_mean": k["kld_mean"], "bpw": k["bpw"],
                                    "bpw_body": k["bpw_body"],
                                    "best_ours_ppl_minus_it": round(best_ppl["ppl"] - k["ppl"], 4),
                                    "best_ours_kld_over_it": round(best_kld["kld_mean"] / k["kld_mean"], 4)}
    return out


def kquant_targets(rows: list[dict], fp_ppl: float) -> dict:
    """Issue 6: ours vs llama.cpp+imatrix per mixture — Q4_K_M mean-KLD ratio (target ≤ 0.7) and
    Q3_K_M PPL-gap ratio (target ≤ 0.7), with the bits per weight of both."""
    by_slug = {r["slug"]: r for r in rows}
    out = {}
    for ftype in K_MIXTURES:
        low = ftype.lower()
        base = by_slug.get(f"llamacpp-{low}-imatrix")
        ours = [r for r in rows if r["slug"].startswith(f"ours-{low}-")]
        if base is None or not ours:
            continue
        best_kld = min(ours, key=lambda r: r["kld_mean"])
        best_ppl = min(ours, key=lambda r: r["ppl"])
        out[ftype] = {"llama.cpp+imatrix": {"ppl": base["ppl"], "kld_mean": base["kld_mean"], "bpw": base["bpw"]},
                      "best_ours_kld": {"name": best_kld["name"], "kld_mean": best_kld["kld_mean"],
                                        "bpw": best_kld["bpw"]},
                      "best_ours_ppl": {"name": best_ppl["name"], "ppl": best_ppl["ppl"], "bpw": best_ppl["bpw"]},
                      "kld_ratio": round(best_kld["kld_mean"] / base["kld_mean"], 4),
                      "ppl_gap_ratio": round((best_ppl["ppl"] - fp_ppl) / (base["ppl"] - fp_ppl), 4),
                      "bpw_rel_diff": round(best_kld["bpw"] / base["bpw"] - 1, 4)}
    if "Q4_K_M" in out:
        out["Q4_K_M"]["target"] = "kld_ratio <= 0.7"
        out["Q4_K_M"]["target_met"] = out["Q4_K_M"]["kld_ratio"] <= 0.7
    if "Q3_K_M" in out:
        out["Q3_K_M"]["target"] = "ppl_gap_ratio <= 0.7"
        out["Q3_K_M"]["target_met"] = out["Q3_K_M"]["ppl_gap_ratio"] <= 0.7
    return out


# --- main -------------------------------------------------------------------------------------

@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--build-dir", type=click.Path(path_type=Path), default=WORK / "llama.cpp", show_default=True,
              help="Where build_llama_tools.sh builds llama.cpp (binaries in BUILD_DIR/build/bin).")
@click.option("--skip-build", is_flag=True, help="Do not run build_llama_tools.sh; the binaries must exist.")
@click.option("--only", multiple=True, metavar="NAME",
              help="Only these rows (slug or name, repeatable); the F32 reference is always made.")
@click.option("--chunks", type=int, default=16, show_default=True,
              help="llama-perplexity chunks of --ctx tokens, the same for every file.")
@click.option("--ctx", type=int, default=512, show_default=True, help="llama-perplexity context length.")
@click.option("--imatrix-chunks", type=int, default=16, show_default=True,
              help="llama-imatrix chunks (of --ctx tokens) of the calibration split.")
@click.option("--threads", type=int, default=2, show_default=True, help="llama.cpp threads.")
@click.option("--calib-samples", type=int, default=None,
              help="GPTQ calibration segments passed to respin-export (default: the CLI's default).")
@click.option("--parity/--no-parity", default=True, show_default=True,
              help="Also run respin-export --eval on the Hadamard GPTQ Q4_0 file for torch<->llama.cpp parity.")
@click.option("--parity-tokens", type=int, default=8192, show_default=True, help="--eval-tokens of the parity run.")
@click.option("--cached-only", is_flag=True,
              help="Run nothing: write the results from what earlier (interrupted) runs cached, listing the rest.")
def main(build_dir, skip_build, only, chunks, ctx, imatrix_chunks, threads, calib_samples, parity, parity_tokens,
         cached_only):
    """Measure our GGUF files and llama.cpp's own quantizations with llama-perplexity."""
    global CACHED_ONLY
    CACHED_ONLY = cached_only
    t_start = time.perf_counter()
    specs = select_specs(only)
    for sub in ("models", "reports", "logs", "ppl", "rows"):
        (WORK / sub).mkdir(parents=True, exist_ok=True)
    bin_dir = ensure_tools(build_dir.resolve(), skip_build or cached_only)
    texts = write_texts()
    kld_base = WORK / "models" / f"f32.c{ctx}-k{chunks}.kld"

    log("FP reference: F32 GGUF")
    made = {FP.slug: export_ours(FP, None)}
    measured = {FP.slug: perplexity(FP, bin_dir, texts["evaluation"], chunks, ctx, threads, kld_base)}
    imatrix = parity_report = None
    missing = []
    for spec in specs:
        if spec is FP:
            continue
        try:
            log(f"{spec.name}: make")
            if spec.kind == "ours":
                made[spec.slug] = export_ours(spec, calib_samples)
            else:
                if spec.imatrix and imatrix is None:
                    imatrix = make_imatrix(bin_dir, Path(texts["calibration"]["path"]), imatrix_chunks, ctx, threads)
                made[spec.slug] = quantize_llamacpp(spec, bin_dir, imatrix, threads)
            log(f"{spec.name}: llama-perplexity")
            measured[spec.slug] = perplexity(spec, bin_dir, texts["evaluation"], chunks, ctx, threads, kld_base)
        except NotCached:
            missing.append(spec.name)
            continue
        r = measured[spec.slug]
        log(f"{spec.name}: PPL {r['ppl']:.4f}  KLD {r['kld_mean']:.5f}  {r.get('tok_s', 0):.0f} tok/s")
        if spec.slug == PARITY_OF and parity and not only:  # right after its row: it matters more than Q4_1
            log("parity: respin-export --eval (Hadamard GPTQ Q4_0)")
            try:
                parity_report = parity_run(parity_tokens, calib_samples)
            except NotCached:
                missing.append("parity")

    rows = [build_row(s, made[s.slug], measured[s.slug], texts["evaluation"], chunks, ctx)
            for s in [FP, *[s for s in specs if s is not FP]] if s.slug in measured]
    fp_ppl = measured[FP.slug]["ppl"]

    result = assemble(rows, fp_ppl, texts, chunks, ctx, threads, imatrix, calib_samples, parity_report,
                      made[FP.slug], llama_version(build_dir.resolve()), time.perf_counter() - t_start)
    if missing:
        result["missing"] = missing  # --cached-only: rows / parity not measured yet
        log(f"not measured yet: {', '.join(missing)}")
    if only:  # a partial run must not overwrite the full results
        out_json = WORK / "gguf_quality.partial.json"
        write_json(out_json, result)
    else:
        out_json = RESULTS / "gguf_quality.json"
        write_json(out_json, result)
        (RESULTS / "gguf_quality.md").write_text(markdown_md(result) + "\n")
    print_table(rows, fp_ppl)
    t = result.get("targets")
    if t:
        click.echo(f"target (≤ 0.5 × llama.cpp Q4_0): PPL gap ratio {t['ppl_gap_ratio']:.3f} "
                   f"({'met' if t['ppl_target_met'] else 'NOT met'}), KLD ratio {t['kld_ratio']:.3f} "
                   f"({'met' if t['kld_target_met'] else 'NOT met'})")
    if parity_report:
        for key in ("parity", "parity_fp32"):
            click.echo(f"{key}: {result[key]}")
    click.echo(f"wrote {out_json} in {result['run_s']:.0f} s")


def assemble(rows, fp_ppl, texts, chunks, ctx, threads, imatrix, calib_samples, parity_report, fp_report,
             llama_cpp, run_s) -> dict:
    result = {
        "fp_ppl": fp_ppl,
        "rows": rows,
        "eval": {"tool": "llama-perplexity", "chunks": chunks, "ctx": ctx, "tokens": chunks * ctx,
                 "tokens_scored": chunks * (ctx - 1 - ctx // 2),
                 "scoring": "llama-perplexity scores the second half of each chunk (first n_ctx/2 tokens are context)",
                 "threads": threads, "text": "evaluation split of converter.data.load_corpus()",
                 "text_sha256": texts["evaluation"]["sha256"], "text_chars": texts["evaluation"]["chars"],
                 "kld_base": "logits of the F32 GGUF (FP reference) on the same chunks"},
        "calibration": {"imatrix": imatrix, "gptq_calib_samples": calib_samples or "CLI default",
                        "text_sha256": texts["calibration"]["sha256"]},
        "heads": ("token_embd.weight and output.weight: our Q4_0/Q4_1 files have Q8_0 (--head-type default, untied "
                  "output); our K-mixture files have llama.cpp's own type for every tensor. "
                  "llama.cpp's rows are llama-quantize of the same untied F32 file, so they also carry an untied "
                  "output (their own type choice per tensor); bpw_body excludes both tensors."),
        "targets": targets(rows, fp_ppl),
        "kquant_targets": kquant_targets(rows, fp_ppl),
        "versions": {**(fp_report.get("versions") or {}), "llama.cpp": llama_cpp},
        "run_s": round(run_s, 1),  # this invocation only (cached steps cost nothing)
        "compute_s": _compute_s(rows, imatrix, parity_report),
    }
    if parity_report is not None:
        v = parity_report["validation"]
        result["parity"] = v.get("parity")
        result["parity_fp32"] = v.get("parity_fp32")
        result["parity_run"] = {"file": "ours Q4_0 GPTQ+Hadamard (separate --eval conversion)",
                                "eval_tokens": v.get("tokens") or v.get("eval_tokens"),
                                "validation": {k: v[k] for k in v if k not in ("parity", "parity_fp32")},
                                "same_bytes_as_row": _same_bytes(PARITY_SPEC.gguf,
                                                                 WORK / "models" / f"{PARITY_OF}.gguf")}
    return result


def _compute_s(rows: list[dict], imatrix: dict | None, parity_report: dict | None) -> float:
    """Wall time of every step behind the results, summed over the (possibly resumed) runs."""
    total = sum(r["convert_s"] or 0.0 for r in rows) + (imatrix or {}).get("wall_s", 0.0)
    for r in rows:
        cached = read_json(WORK / "ppl" / f"{r['slug']}.c{r['ctx']}-k{r['tokens'] // r['ctx']}.json") or {}
        total += cached.get("wall_s", 0.0)
    if parity_report is not None:
        total += sum((parity_report.get("timings_s") or {}).values())
    return round(total, 1)


def _same_bytes(a: Path, b: Path) -> bool | None:
    if not (a.exists() and b.exists()):
        return None
    return a.stat().st_size == b.stat().st_size and sha256_file(a) == sha256_file(b)


def markdown_md(result: dict) -> str:
    e = result["eval"]
    lines = [f"SmolLM2-135M, llama.cpp `llama-perplexity` on the evaluation split: {e['chunks']} chunks × "
             f"{e['ctx']} tokens ({e['tokens_scored']} scored tokens), KLD against our F32 GGUF's logits. "
             f"FP PPL {result['fp_ppl']:.3f}.", "", markdown_table(result["rows"], result["fp_ppl"])]
    im = (result.get("calibration") or {}).get("imatrix")
    lines += ["", "bpw counts every tensor; *bpw body* leaves out `token_embd.weight` and `output.weight`. All "
                  "files carry an untied output: our Q4_0/Q4_1 files have Q8_0 for both (the `--head-type` default), "
                  "llama.cpp's are `llama-quantize` of our same F32 file with its own per-tensor choices (Q4_0/Q4_1: "
                  "4-bit `token_embd`, Q8_0 `output`), so *bpw body* compares equal grids there. Our K-mixture "
                  "files (Q4_K_M, Q3_K_M, Q2_K) have exactly llama.cpp's type for every tensor, head and embedding "
                  "included (equal bpw): the rows differ only in how the weights were rounded. pp tok/s is llama.cpp's prompt "
                  f"throughput during the perplexity run ({e['threads']} threads, shared machine: noisy)."
                  + (f" imatrix: `llama-imatrix` on the calibration split, {im['chunks']} × {im['ctx']} tokens."
                     if im else "")]
    t = result.get("targets")
    if t:
        lines += ["", f"Target (our best Q4_0 ≤ 0.5 × llama.cpp Q4_0's gap): PPL gap ratio "
                      f"{t['ppl_gap_ratio']:.2f} ({'met' if t['ppl_target_met'] else 'not met'}), mean-KLD ratio "
                      f"{t['kld_ratio']:.2f} ({'met' if t['kld_target_met'] else 'not met'})."]
    for ftype, k in (result.get("kquant_targets") or {}).items():
        goal = f" — target {k['target']}: {'met' if k['target_met'] else 'not met'}" if "target" in k else ""
        lines.append(f"{ftype} vs llama.cpp {ftype}+imatrix ({k['llama.cpp+imatrix']['bpw']:.2f} bpw): best mean KLD "
                     f"{k['best_ours_kld']['name']} {k['best_ours_kld']['kld_mean']:.4f} ({k['best_ours_kld']['bpw']:.2f} "
                     f"bpw, ratio {k['kld_ratio']:.2f}); PPL-gap ratio {k['ppl_gap_ratio']:.2f}{goal}.")
    if result.get("missing"):
        lines += ["", f"**Partial results** — not measured yet: {', '.join(result['missing'])}."]
    for key, label in (("parity", "with activation-block emulation"), ("parity_fp32", "fp32 torch, no emulation")):
        p = result.get(key)
        if p:
            lines.append(f"Parity torch↔llama.cpp ({label}): " + ", ".join(f"{k} {v}" for k, v in p.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
