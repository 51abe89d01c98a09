#!/usr/bin/env python
"""Held-out check of ReSpinQuant's training knobs: the basis lr scale (`TrainConfig.basis_lr_scale`)
and the rank-32 tail-energy penalty (`TrainConfig.skip_rank_penalty`).

Trains respin rotations on SmolLM2 for each `scale:penalty` pair (W16 training at A4KV4 or
--act-bits, the CLI's other defaults) and reports the W16 perplexity at those bits of the stored
rotations (float32, re-orthogonalized: what a rotations file gives back) with the exact skip path
and with rank-32 corrections, on held-out *calibration-split* segments under another seed — never
the evaluation split. The Hadamard start is the baseline; the mean rank-32 tail energy shows how
much of the transitions rank 32 drops.

    python benchmarks/respin_heldout.py --configs 1:0,8:0,8:0.1     # ~10 min a config on 2 cores
    python benchmarks/respin_heldout.py --configs 8:10,8:30 --act-bits 3 --results-name respin_heldout_a3

Writes benchmarks/results/respin_heldout.json (or --results-name).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import click

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

RANK = 32


def parse_configs(text: str) -> list[tuple[float, float]]:
    try:
        return [(float(scale), float(penalty)) for scale, penalty in (c.split(":") for c in text.split(","))]
    except ValueError:
        raise click.BadParameter(f"expected scale:penalty pairs like 1:0,8:0.1 (got {text!r})") from None


@click.command()
@click.option("--configs", default="1:0,8:0", show_default=True,
              help="Comma-separated basis-lr-scale:rank-32-penalty pairs.")
@click.option("--steps", default=32, show_default=True)
@click.option("--heldout", default=16, show_default=True, help="Held-out calibration segments of 512 tokens.")
@click.option("--act-bits", default=4, show_default=True, help="Activation and KV bits of training and evaluation.")
@click.option("--results-name", default="respin_heldout", show_default=True)
def main(configs: str, steps: int, heldout: int, act_bits: int, results_name: str) -> None:
    from converter.data import CorpusConfig, calibration_batches, evaluation_tokens, load_corpus
    from converter.loading import load_model
    from converter.simquant import SimSpec, build_simquant, learn_rotations
    from rotations.respin import tail_energy, transitions
    from rotations.rotations import hadamard_rotations
    from rotations.training import TrainConfig
    from rotation_quality import drift  # this folder is the script's sys.path[0]

    pairs = parse_configs(configs)
    loaded = load_model(None)
    corpus = load_corpus(CorpusConfig())
    tok = loaded.tokenizer
    train_segments = calibration_batches(tok, corpus.calibration, 64, 256, seed=1)  # the CLI's training data
    held = calibration_batches(tok, corpus.calibration, heldout, 512, seed=12345)
    probe = evaluation_tokens(tok, corpus.calibration, 128, 128)

    spec = SimSpec(wbits=16, abits=act_bits, kvbits=act_bits)

    def heldout_ppl(rotations, rank) -> float:
        sim = build_simquant(loaded, rotations, replace(spec, rank=rank), probe, None)
        return sim.perplexity(held, progress=False)[0]

    rows = [{"rotations": "hadamard", "heldout_ppl": heldout_ppl(hadamard_rotations(loaded.shape), "full")}]
    print(rows[-1], flush=True)
    for scale, penalty in pairs:
        cfg = TrainConfig(kind="respin", steps=steps, basis_lr_scale=scale, quantize_weights=False,
                          skip_rank=RANK, skip_rank_penalty=penalty)
        start = time.perf_counter()
        rot = learn_rotations(loaded, cfg, spec.online(), None, train_segments).as_stored()
        train_s = time.perf_counter() - start
        rows.append({"rotations": "respin", "basis_lr_scale": scale, "rank32_penalty": penalty,
                     "heldout_ppl": heldout_ppl(rot, "full"), f"heldout_ppl_rank{RANK}": heldout_ppl(rot, RANK),
                     f"tail_energy_rank{RANK}": float(tail_energy(transitions(rot.R1), RANK).mean()),
                     "drift": drift(rot), "train_loss_last": rot.config["train_loss_last"],
                     "train_s": round(train_s, 1)})
        print(rows[-1], flush=True)
    out = HERE / "results" / f"{results_name}.json"
    out.write_text(json.dumps({"sim": f"W16A{act_bits}KV{act_bits}; heldout_ppl: exact skip path",
                               "heldout_tokens": heldout * 512,
                               "steps": steps, "rows": rows,
                               "command": "python benchmarks/respin_heldout.py " + " ".join(sys.argv[1:])},
                              indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
