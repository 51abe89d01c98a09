"""The simulated-quant reference on SmolLM2 (slow): exact with full-rank corrections, and rotations
help where the papers say they do (A8 activations with SmolLM2's outliers)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import near_hadamard_bases

from converter.data import CorpusConfig, evaluation_tokens, load_corpus
from converter.loading import load_model
from converter.simquant import SimSpec, build_simquant
from rotations.respin import skip_corrections
from rotations.rotations import Rotations, hadamard_rotations

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_model(None)


@pytest.fixture(scope="module")
def texts(smollm2):
    corpus = load_corpus(CorpusConfig())
    tok = smollm2.tokenizer
    return evaluation_tokens(tok, corpus.calibration, 64, 64), evaluation_tokens(tok, corpus.evaluation, 256, 512)


def test_respin_bases_with_online_ops_keep_the_function(smollm2, texts):
    """61 different bases, R3/R4 online, rank-full corrections: logits as the original (float32 gate)."""
    probe, _ = texts
    rot = Rotations("respin", near_hadamard_bases(smollm2.shape, 0.01), hadamard_rotations(smollm2.shape).R2)
    sim = build_simquant(smollm2, rot, SimSpec(wbits=16, abits=16, kvbits=16, rank="full"), probe, None)
    assert sim.invariance.passed and sim.correction_fp_err < 1e-3
    # rank 32 is an approximation: its FP error is reported, and larger than at full rank
    low = build_simquant(smollm2, rot, SimSpec(wbits=16, abits=16, kvbits=16, rank=32), probe, None)
    assert low.correction_fp_err > sim.correction_fp_err
    assert low.online_macs_per_token == 60 * (2 * 576 * 32 + 32 * 32)
    T = skip_corrections(rot.R1[:2], 32)[0].dense()
    assert (T.T @ T - torch.eye(576, dtype=torch.float64)).abs().max() < 1e-10


def test_hadamard_beats_no_rotation_at_a8kv8(smollm2, texts):
    probe, segments = texts
    spec = SimSpec(wbits=8, abits=8, kvbits=8, wquant="rtn")
    plain = build_simquant(smollm2, None, spec, probe, None)
    rotated = build_simquant(smollm2, hadamard_rotations(smollm2.shape), spec, probe, None)
    ppl_plain, _ = plain.perplexity(segments, progress=False)
    ppl_rot, _ = rotated.perplexity(segments, progress=False)
    assert ppl_rot < ppl_plain
