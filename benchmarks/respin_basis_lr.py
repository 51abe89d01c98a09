#!/usr/bin/env python
"""Held-out check of ReSpinQuant's basis lr scale (`TrainConfig.basis_lr_scale`).

Trains respin rotations on SmolLM2 with each R1 lr multiplier (W16A4KV4 training, the CLI's other
defaults) and reports the W16A4KV4 perplexity of the stored rotations (float32, re-orthogonalized:
what a rotations file gives back) with the exact skip path, on held-out *calibration-split*
segments under another seed — never the evaluation split. The Hadamard start is the baseline.

    python benchmarks/respin_basis_lr.py --scales 1,8     # ~10 min a scale on 2 cores

Writes benchmarks/results/respin_basis_lr.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


@click.command()
@click.option("--scales", default="1,8", show_default=True, help="Comma-separated R1 lr multipliers.")
@click.option("--steps", default=32, show_default=True)
@click.option("--heldout", default=16, show_default=True, help="Held-out calibration segments of 512 tokens.")
def main(scales: str, steps: int, heldout: int) -> None:
    from converter.data import CorpusConfig, calibration_batches, evaluation_tokens, load_corpus
    from converter.loading import load_model
    from converter.simquant import SimSpec, build_simquant, learn_rotations
    from rotations.rotations import hadamard_rotations
    from rotations.training import TrainConfig
    from rotation_quality import drift  # this folder is the script's sys.path[0]

    loaded = load_model(None)
    corpus = load_corpus(CorpusConfig())
    tok = loaded.tokenizer
    train_segments = calibration_batches(tok, corpus.calibration, 64, 256, seed=1)  # the CLI's training data
    held = calibration_batches(tok, corpus.calibration, heldout, 512, seed=12345)
    probe = evaluation_tokens(tok, corpus.calibration, 128, 128)
    spec = SimSpec(wbits=16, abits=4, kvbits=4, rank="full")

    def heldout_ppl(rotations) -> float:
        sim = build_simquant(loaded, rotations, spec, probe, None)
        return sim.perplexity(held, progress=False)[0]

    hadamard = hadamard_rotations(loaded.shape)
    rows = [{"rotations": "hadamard", "heldout_ppl": heldout_ppl(hadamard)}]
    print(rows[-1], flush=True)
    for scale in (float(s) for s in scales.split(",")):
        cfg = TrainConfig(kind="respin", steps=steps, basis_lr_scale=scale, quantize_weights=False)
        start = time.perf_counter()
        rot = learn_rotations(loaded, cfg, spec.online(), None, train_segments).as_stored()
        rows.append({"rotations": "respin", "basis_lr_scale": scale, "heldout_ppl": heldout_ppl(rot),
                     "drift": drift(rot), "train_s": round(time.perf_counter() - start, 1)})
        print(rows[-1], flush=True)
    out = HERE / "results" / "respin_basis_lr.json"
    out.write_text(json.dumps({"sim": "W16A4KV4, exact skip path", "heldout_tokens": heldout * 512,
                               "steps": steps, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
