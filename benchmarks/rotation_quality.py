#!/usr/bin/env python
"""Rotation quality benchmark: simulated W·A·KV-bit perplexity of SmolLM2 for no rotation (RTN),
Hadamard (QuaRot mode), SpinQuant and ReSpinQuant at several skip-correction ranks.

Every row is the simulated-quant reference (`converter.simquant`): per-channel symmetric intN
weights (GPTQ or RTN), per-token asymmetric activations, per-token-per-head asymmetric KV cache,
online R3/R4 Hadamards, ReSpinQuant's rank-r skip corrections; perplexity on the evaluation split.

Rotations are trained once per bit setting in a child process (so its wall time and peak RSS are its
own); W4A8KV8 rows reuse the W4A4KV4 rotations. ReSpinQuant ranks share one training; with
--gptq-per-rank each rank also gets its own GPTQ pass (default: GPTQ once on the exact, rank-full
model, the same weights then run with each rank's corrections).

Everything is cached in benchmarks/work/rotation_quality/, so an interrupted run continues.
Results: benchmarks/results/rotation_quality.{json,md}.

    python benchmarks/rotation_quality.py                 # everything (about an hour on 2 cores)
    python benchmarks/rotation_quality.py --only W4A4KV4  # one bit setting
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
WORK = HERE / "work" / "rotation_quality"
RESULTS = HERE / "results"
CACHE_VERSION = 1

RANKS = (0, 8, 32, "full")


@dataclass(frozen=True)
class Row:
    mode: str  # none | hadamard | spinquant | respin
    wbits: int
    abits: int
    kvbits: int
    wquant: str  # gptq | rtn
    rank: int | str | None = None

    @property
    def bits(self) -> str:
        return f"W{self.wbits}A{self.abits}KV{self.kvbits}"

    @property
    def slug(self) -> str:
        rank = "" if self.rank is None else f"-r{self.rank}"
        return f"{self.bits}-{self.mode}{rank}-{self.wquant}"

    @property
    def train_bits(self) -> tuple[int, int, int]:
        # W4A8KV8 reuses the rotations trained for W4A4KV4
        return (4, 4, 4) if (self.wbits, self.abits, self.kvbits) == (4, 8, 8) else (self.wbits, self.abits, self.kvbits)


def all_rows() -> list[Row]:
    rows = []
    for w, a, kv in ((4, 4, 4), (4, 8, 8)):
        rows += [Row("none", w, a, kv, "rtn"), Row("hadamard", w, a, kv, "gptq"), Row("hadamard", w, a, kv, "rtn"),
                 Row("spinquant", w, a, kv, "gptq")]
        rows += [Row("respin", w, a, kv, "gptq", r) for r in RANKS] + [Row("respin", w, a, kv, "rtn", 32)]
    rows += [Row("spinquant", 3, 3, 3, "gptq")]
    rows += [Row("respin", 3, 3, 3, "gptq", r) for r in RANKS] + [Row("respin", 3, 3, 3, "rtn", 32)]
    return rows


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if data.get("cache_version") == CACHE_VERSION else None


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({**data, "cache_version": CACHE_VERSION}, indent=1))
    tmp.replace(path)


# --- training (child process) ------------------------------------------------------------------

def rotations_path(kind: str, bits: tuple[int, int, int]) -> Path:
    return WORK / "rotations" / f"{kind}-W{bits[0]}A{bits[1]}KV{bits[2]}.safetensors"


def respin_train_fields(settings: dict, abits: int) -> dict:
    """ReSpinQuant's TrainConfig fields: basis lr scale and the penalty aimed at rank 32 (the table's
    headline rank; None in the settings: the CLI's default for the activation bits)."""
    from rotations.training import default_rank_penalty

    penalty = settings["respin_rank32_penalty"]
    return {"basis_lr_scale": settings["respin_basis_lr_scale"], "skip_rank": 32,
            "skip_rank_penalty": default_rank_penalty(abits) if penalty is None else penalty}


def train_child(kind: str, bits: tuple[int, int, int], settings: dict) -> None:
    """Runs in a child process: train, save rotations + {train_s, peak_rss_mb}."""
    from converter.data import CorpusConfig, calibration_batches, load_corpus
    from converter.loading import load_model
    from converter.report import peak_rss_mb
    from converter.simquant import SimSpec, learn_rotations
    from rotations.training import TrainConfig

    loaded = load_model(None)
    corpus = load_corpus(CorpusConfig())
    train = TrainConfig(kind=kind, steps=settings["steps"], lr=settings["lr"],
                        **(respin_train_fields(settings, bits[1]) if kind == "respin" else {}),
                        seq_len=settings["seq_len"],
                        batch_size=settings["batch_size"], quantize_weights=settings["quantize_weights"])
    spec = SimSpec(wbits=bits[0], abits=bits[1], kvbits=bits[2])
    segments = calibration_batches(loaded.tokenizer, corpus.calibration, settings["samples"], train.seq_len, seed=1)
    path = rotations_path(kind, bits)
    start = time.perf_counter()
    rotations = learn_rotations(loaded, train, spec.online(), spec.weight_grid(), segments,
                                checkpoint=path.with_suffix(".ckpt"), resume=path.with_suffix(".ckpt").exists())
    train_s = time.perf_counter() - start
    rotations.save(path)
    write_json(path.with_suffix(".json"), {"train_s": round(train_s, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
                                           "settings": settings, "loss_first": rotations.config["train_loss_first"],
                                           "loss_last": rotations.config["train_loss_last"]})


def ensure_rotations(kind: str, bits: tuple[int, int, int], settings: dict) -> dict:
    path = rotations_path(kind, bits)
    meta = read_json(path.with_suffix(".json"))
    if meta is not None and path.exists() and meta.get("settings") == settings:
        return meta
    log(f"training {kind} rotations for W{bits[0]}A{bits[1]}KV{bits[2]} ({settings['steps']} steps)")
    cmd = [sys.executable, __file__, "--train-one", f"{kind}:{bits[0]}:{bits[1]}:{bits[2]}",
           "--settings", json.dumps(settings)]
    subprocess.run(cmd, check=True)
    meta = read_json(path.with_suffix(".json"))
    log(f"  trained in {meta['train_s']:.0f} s, loss {meta['loss_first']:.3f} → {meta['loss_last']:.3f}")
    return meta


# --- rows ---------------------------------------------------------------------------------------

def drift(rotations) -> float:
    """‖R − H‖_F / ‖H‖_F of R1 against the Hadamard it started from (mean over ReSpinQuant's bases)."""
    import torch

    from rotations.hadamard import offline_rotation

    H = offline_rotation(rotations.R1.shape[-1]).matrix
    R = rotations.R1 if rotations.per_block else rotations.R1[None]
    return float((torch.linalg.norm(R - H, dim=(-2, -1)) / torch.linalg.norm(H)).mean())


class Bench:
    def __init__(self, eval_tokens: int, ctx: int, calib_samples: int, settings: dict, gptq_per_rank: bool) -> None:
        from converter.data import CorpusConfig, calibration_batches, evaluation_tokens, load_corpus
        from converter.loading import load_model
        from converter.parity import perplexity

        self.loaded = load_model(None)
        corpus = load_corpus(CorpusConfig())
        tok = self.loaded.tokenizer
        self.segments = evaluation_tokens(tok, corpus.evaluation, ctx, eval_tokens)
        self.probe = evaluation_tokens(tok, corpus.calibration, 128, 128)
        self.calibration = calibration_batches(tok, corpus.calibration, calib_samples, 512, seed=0)
        self.settings, self.gptq_per_rank = settings, gptq_per_rank
        fp_cache = WORK / f"fp-{eval_tokens}-{ctx}.json"
        cached = read_json(fp_cache)
        if cached is None:
            acc = perplexity(self.loaded.model, self.segments)
            cached = {"fp_ppl": acc.ppl, "tokens": acc.n_pred}
            write_json(fp_cache, cached)
        self.fp_ppl, self.tokens = cached["fp_ppl"], cached["tokens"]
        self.key = {"eval_tokens": eval_tokens, "ctx": ctx, "calib_samples": calib_samples, "train": settings,
                    "gptq_per_rank": gptq_per_rank}

    def rotations(self, row: Row):
        from rotations.rotations import Rotations, hadamard_rotations

        if row.mode == "none":
            return None, {}
        if row.mode == "hadamard":
            return hadamard_rotations(self.loaded.shape), {}
        meta = ensure_rotations(row.mode, row.train_bits, self.settings)
        return Rotations.load(rotations_path(row.mode, row.train_bits)), meta

    def measure(self, row: Row) -> dict:
        from converter.simquant import SimSpec, model_macs_per_token

        cache = WORK / "rows" / f"{row.slug}.json"
        cached = read_json(cache)
        if cached is not None and cached.get("key") == self.key:
            return cached["row"]
        rotations, meta = self.rotations(row)
        log(f"{row.slug}: quantize + evaluate")
        start = time.perf_counter()
        spec = SimSpec(wbits=row.wbits, abits=row.abits, kvbits=row.kvbits, wquant=row.wquant,
                       rank=row.rank if row.rank is not None else 32)
        sim = self._build(row, rotations, spec)
        ppl, tokens = sim.perplexity(self.segments, progress=False)
        sim.handle.remove()
        macs = sim.online_macs_per_token if row.mode == "respin" else None
        result = {"mode": row.mode, "rank": row.rank, "wbits": row.wbits, "abits": row.abits, "kvbits": row.kvbits,
                  "wquant": row.wquant, "ppl": ppl, "tokens": tokens, "train_s": meta.get("train_s"),
                  "peak_rss_mb": meta.get("peak_rss_mb"), "drift": None if rotations is None or not meta else drift(rotations),
                  "online_macs_per_token": macs,
                  "online_macs_pct": None if macs is None else 100 * macs / model_macs_per_token(self.loaded),
                  "correction_fp_max_abs_logit_err": sim.correction_fp_err, "rotations_from": row.train_bits if meta else None,
                  "quant_eval_s": round(time.perf_counter() - start, 1)}
        write_json(cache, {"key": self.key, "row": result})
        log(f"  PPL {ppl:.3f} ({result['quant_eval_s']:.0f} s)")
        return result

    def _build(self, row: Row, rotations, spec):
        """GPTQ weights of respin rows come from the rank-full model (GPTQ'd once per bit setting, the
        full row included) unless --gptq-per-rank."""
        import hashlib
        from dataclasses import replace

        import torch

        from converter.simquant import build_simquant

        calibration = self.calibration if row.wquant == "gptq" else None
        if row.mode != "respin" or row.wquant != "gptq" or self.gptq_per_rank:
            return build_simquant(self.loaded, rotations, spec, self.probe, calibration)
        tag = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:12]
        shared = WORK / "weights" / f"{row.bits}-respin-full-gptq-{tag}.pt"
        if not shared.exists():
            full = build_simquant(self.loaded, rotations, replace(spec, rank="full"), self.probe, calibration)
            shared.parent.mkdir(parents=True, exist_ok=True)
            torch.save({k: v.detach().clone() for k, v in full.model.state_dict().items()}, shared)
            if row.rank == "full":
                return full
            full.handle.remove()
        sim = build_simquant(self.loaded, rotations, replace(spec, wbits=16), self.probe, None)
        sim.model.load_state_dict(torch.load(shared, weights_only=True))
        return sim


# --- output -----------------------------------------------------------------------------------

def noise_floor(bench: Bench, seeds: int) -> list[dict]:
    """W4A4KV4 perplexity of equally good rotations: Hadamard R1/R2 with random sign flips (diag(±1)·H).
    Their spread says how far apart two rows must be to mean anything on this chaotic model."""
    import torch

    from converter.simquant import SimSpec, build_simquant
    from rotations.rotations import Rotations, hadamard_rotations

    out = []
    base = hadamard_rotations(bench.loaded.shape)
    for seed in range(1, seeds + 1):
        for wquant in ("rtn", "gptq") if seed == 1 else ("rtn",):  # GPTQ costs ~3 min a seed
            cache = WORK / "noise" / f"seed{seed}-{wquant}.json"
            cached = read_json(cache)
            if cached is not None and cached.get("key") == bench.key:
                out.append(cached["row"])
                continue
            g = torch.Generator().manual_seed(seed)
            s1 = torch.randint(0, 2, (base.R1.shape[0],), generator=g).double() * 2 - 1
            s2 = torch.randint(0, 2, (base.R2.shape[-1],), generator=g).double() * 2 - 1
            rot = Rotations("hadamard", s1[:, None] * base.R1, s2[:, None] * base.R2)
            log(f"noise floor: sign-flipped Hadamard seed {seed}, {wquant}")
            sim = build_simquant(bench.loaded, rot, SimSpec(wquant=wquant), bench.probe,
                                 bench.calibration if wquant == "gptq" else None)
            ppl, _ = sim.perplexity(bench.segments, progress=False)
            sim.handle.remove()
            row = {"seed": seed, "wquant": wquant, "ppl": ppl}
            write_json(cache, {"key": bench.key, "row": row})
            log(f"  PPL {ppl:.3f}")
            out.append(row)
    return out


def markdown_table(rows: list[dict], fp_ppl: float) -> str:
    head = ("| bits | mode | rank | weights | PPL | ΔPPL | train s | peak RSS MB | drift | online MACs/token |\n"
            "|:--|:--|--:|:--|--:|--:|--:|--:|--:|--:|")
    lines = [head, f"| FP | – | | | {fp_ppl:.3f} | | | | | |"]
    for r in rows:
        f = (lambda v, fmt: "" if v is None else format(v, fmt))
        macs = "" if r["online_macs_per_token"] is None else f"{r['online_macs_per_token']:,} ({r['online_macs_pct']:.2f}%)"
        lines.append(f"| W{r['wbits']}A{r['abits']}KV{r['kvbits']} | {r['mode']} | {f(r['rank'], '')} | "
                     f"{r['wquant'].upper()} | {r['ppl']:.3f} | {r['ppl'] - fp_ppl:+.3f} | {f(r['train_s'], '.0f')} | "
                     f"{f(r['peak_rss_mb'], '.0f')} | {f(r['drift'], '.3f')} | {macs} |")
    return "\n".join(lines)


def targets(rows: list[dict], fp_ppl: float) -> dict:
    """The issue's targets, for each bit setting where the rows exist."""
    out = {}
    for bits in sorted({(r["wbits"], r["abits"], r["kvbits"]) for r in rows}):
        sel = {(r["mode"], r["rank"], r["wquant"]): r["ppl"] for r in rows if (r["wbits"], r["abits"], r["kvbits"]) == bits}
        name = "W{}A{}KV{}".format(*bits)
        t = {}
        chain = [sel.get(k) for k in (("none", None, "rtn"), ("hadamard", None, "gptq"), ("spinquant", None, "gptq"),
                                      ("respin", 32, "gptq"))]
        if all(v is not None for v in chain):
            t["ordering_rtn>hadamard>spinquant>respin32"] = all(a > b for a, b in zip(chain, chain[1:]))
        had, r32, rfull = sel.get(("hadamard", None, "gptq")), sel.get(("respin", 32, "gptq")), sel.get(("respin", "full", "gptq"))
        if had is not None and r32 is not None:
            t["respin32_gap_over_hadamard_gap"] = (r32 - fp_ppl) / (had - fp_ppl)
        if r32 is not None and rfull is not None:
            t["respin32_vs_full_rel"] = r32 / rfull - 1
        out[name] = t
    return out


@click.command()
@click.option("--only", multiple=True, help="Row slugs or bit settings (e.g. W4A4KV4) to run.")
@click.option("--eval-tokens", default=8192, show_default=True)
@click.option("--ctx", default=512, show_default=True)
@click.option("--calib-samples", default=32, show_default=True, help="GPTQ calibration segments of 512 tokens.")
@click.option("--train-steps", default=32, show_default=True)
@click.option("--train-lr", default=0.05, show_default=True)
@click.option("--train-basis-lr-scale", default=8.0, show_default=True,
              help="lr multiplier of each ReSpinQuant residual basis (the CLI's respin default).")
@click.option("--train-rank-penalty", default=None, type=float,
              help="Weight of ReSpinQuant's rank-32 tail-energy penalty (TrainConfig.skip_rank_penalty) [default: "
                   "the CLI's at rank 32: 10, or 30 at 3-bit activations].")
@click.option("--train-seq-len", default=256, show_default=True)
@click.option("--train-batch", default=2, show_default=True)
@click.option("--train-rtn-weights", is_flag=True, help="Fake-quantize weights (RTN) while training (default: W16, "
              "SpinQuant's recipe when GPTQ follows).")
@click.option("--train-samples", default=64, show_default=True)
@click.option("--gptq-per-rank", is_flag=True, help="Run GPTQ for every ReSpinQuant rank (slower).")
@click.option("--noise-seeds", default=2, show_default=True,
              help="Sign-flipped Hadamards evaluated at W4A4KV4 (RTN each; GPTQ the first) to measure the noise floor.")
@click.option("--results-name", default="rotation_quality", show_default=True,
              help="Write benchmarks/results/NAME.{json,md} (a partial rerun keeps the full table).")
@click.option("--train-one", default=None, hidden=True)
@click.option("--settings", default=None, hidden=True)
def main(only, eval_tokens, ctx, calib_samples, train_steps, train_lr, train_basis_lr_scale, train_rank_penalty,
         train_seq_len, train_batch,
         train_samples, train_rtn_weights, gptq_per_rank, noise_seeds, results_name, train_one, settings):
    if train_one:
        kind, *bits = train_one.split(":")
        train_child(kind, tuple(int(b) for b in bits), json.loads(settings))
        return
    settings = {"steps": train_steps, "lr": train_lr, "seq_len": train_seq_len, "batch_size": train_batch,
                "samples": train_samples, "quantize_weights": train_rtn_weights}
    settings["respin_basis_lr_scale"] = train_basis_lr_scale
    settings["respin_rank32_penalty"] = train_rank_penalty
    rows = [r for r in all_rows() if not only or r.slug in only or r.bits in only]
    bench = Bench(eval_tokens, ctx, calib_samples, settings, gptq_per_rank)
    log(f"FP PPL {bench.fp_ppl:.3f} on {bench.tokens} tokens; {len(rows)} rows")
    results = [bench.measure(r) for r in rows]
    all_cached = [read_json(WORK / "rows" / f"{r.slug}.json") for r in all_rows()]
    results = [c["row"] for c in all_cached if c is not None and c.get("key") == bench.key]
    noise = noise_floor(bench, noise_seeds)
    data = {"fp_ppl": bench.fp_ppl, "tokens": bench.tokens, "rows": results, "settings": bench.key,
            "noise_floor_w4a4kv4_hadamard_sign_flips": noise,
            "targets": targets(results, bench.fp_ppl),
            "command": "python benchmarks/rotation_quality.py " + " ".join(sys.argv[1:])}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{results_name}.json").write_text(json.dumps(data, indent=1))
    table = markdown_table(results, bench.fp_ppl)
    (RESULTS / f"{results_name}.md").write_text(table + "\n\ntargets: " + json.dumps(data["targets"], indent=1)
                                                 + "\n\nnoise floor: " + json.dumps(noise) + "\n")
    print(table)
    print(json.dumps(data["targets"], indent=1))


if __name__ == "__main__":
    main()
