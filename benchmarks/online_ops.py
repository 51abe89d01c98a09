#!/usr/bin/env python
"""What each online op of a W4A4KV4 decode step costs in onnxruntime with our kernels: N nodes of
the op on one token's shapes (SmolLM2-135M: D = 576, intermediate 1536, 9 query / 3 KV heads of
64, skip-correction rank 32) against N nodes of what the graph has without it, hot (everything in
cache) and cold (a 64 MB ReduceSum in the same run evicts the caches, as a decode step's ~55 MB of
weights does). Each correction node has its own Q and M, as in the model.

    python benchmarks/online_ops.py            # → benchmarks/results/online_ops.{json,md}
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
RESULTS = HERE / "results"
THREADS = 2
NODES = 60
FLUSH_FLOATS = 16 << 20  # 64 MB
D, INTERMEDIATE, HEAD_DIM, Q_HEADS, KV_HEADS, RANK = 576, 1536, 64, 9, 3, 32


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple[int, ...]
    op: str  # a respin op
    attrs: dict
    baseline: str  # "Add" (with Z), "Identity", or the op without its fused Hadamard ("plain")
    chained: bool  # the op's first output feeds the next node
    fused: int = 0  # the Hadamard size fused into the quantizer (the exporter's attributes for it)


def cases() -> list[Case]:
    from rotations.hadamard import hadamard_factorization

    act = {"bits": 4, "symmetric": 0, "clip": 1.0}
    return [
        Case("ResidualCorrection+Z vs Add (skip path, rank 32)", (1, 1, D), "ResidualCorrection", {}, "Add", True),
        Case("Hadamard 64 on Q vs nothing (R3)", (1, Q_HEADS, 1, HEAD_DIM), "Hadamard",
             {"n": HEAD_DIM, "m": hadamard_factorization(HEAD_DIM)[1]}, "Identity", True),
        Case("DynamicQuantize with Hadamard 1536 vs without (R4)", (1, 1, INTERMEDIATE), "DynamicQuantize",
             act, "plain", False, fused=INTERMEDIATE),
        Case("QuantizeKV with Hadamard 64 vs without (R3 on K)", (1, KV_HEADS, 1, HEAD_DIM), "QuantizeKV",
             {"bits": 4}, "plain", False, fused=HEAD_DIM),
    ]


def build(case: Case, with_op: bool, flush: bool, rng: np.random.Generator) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    from converter.export_onnx import _fused_hadamard
    from runtime_ops import functions
    from runtime_ops.schema import OPS

    n_out = len(OPS[case.op].outputs)
    nodes, inits, outputs, x = [], [], [], "x"
    for i in range(NODES):
        outs = [f"n{i}.{k}" for k in range(n_out)]
        inputs = [x if case.chained else "x"]
        if case.op == "ResidualCorrection" and with_op:
            Q = np.linalg.qr(rng.standard_normal((D, RANK)))[0].astype(np.float32)
            M = (0.1 * rng.standard_normal((RANK, RANK))).astype(np.float32)
            inits += [numpy_helper.from_array(Q, f"Q{i}"), numpy_helper.from_array(M, f"M{i}")]
            inputs += [f"Q{i}", f"M{i}", "z"]
        if with_op or case.baseline == "plain":
            attrs = {**case.attrs, **_fused_hadamard(case.fused if with_op else 0)}
            nodes.append(functions.make_node(case.op, inputs, outs, **attrs))
        elif case.baseline == "Add":
            nodes.append(helper.make_node("Add", [inputs[0], "z"], outs[:1]))
        else:
            nodes.append(helper.make_node("Identity", inputs[:1], outs[:1]))
        if case.chained:
            x = outs[0]
        else:
            outputs += outs if with_op or case.baseline == "plain" else outs[:1]
    outputs = [x] if case.chained else outputs
    graph_inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(case.shape)) for n in ("x", "z")]
    if flush:
        nodes.append(helper.make_node("ReduceSum", ["flush"], ["flushed"], keepdims=0))
        graph_inputs.append(helper.make_tensor_value_info("flush", TensorProto.FLOAT, [FLUSH_FLOATS]))
        outputs.append("flushed")
    graph = helper.make_graph(nodes, case.name, graph_inputs,
                              [helper.make_value_info(o, helper.TypeProto()) for o in outputs], inits)
    model = helper.make_model(graph, opset_imports=functions.opset_imports(), ir_version=10)
    model.functions.extend(functions.function_protos(n for n in nodes if n.domain))
    return model.SerializeToString()


def measure(case: Case, flush: bool, rounds: int) -> float:
    """Median extra µs per node: the op's model against its baseline, runs alternating."""
    import onnxruntime as ort

    from runtime_ops.library import session_options

    rng = np.random.default_rng(0)
    sessions = {k: ort.InferenceSession(build(case, k, flush, rng), session_options(True, THREADS)) for k in (True, False)}
    feeds = {"x": rng.standard_normal(case.shape).astype(np.float32),
             "z": rng.standard_normal(case.shape).astype(np.float32)}
    if flush:
        feeds["flush"] = rng.standard_normal(FLUSH_FLOATS).astype(np.float32)
    feeds = {k: {a.name: feeds[a.name] for a in s.get_inputs()} for k, s in sessions.items()}  # the inputs each uses
    times = {k: [] for k in sessions}
    for i in range(rounds + 3):
        for k in ((True, False) if i % 2 == 0 else (False, True)):
            begin = time.perf_counter()
            sessions[k].run(None, feeds[k])
            if i >= 3:  # warm-up rounds left out
                times[k].append(time.perf_counter() - begin)
    return float(np.median(np.subtract(times[True], times[False]))) / NODES * 1e6


@click.command()
@click.option("--rounds", default=200, show_default=True, help="Alternating runs of each model.")
def main(rounds: int) -> None:
    from runtime_ops.library import available

    if not available():
        raise SystemExit("the kernel library is not built: python -m runtime_ops.build")
    rows = []
    for case in cases():
        row = {"case": case.name, "nodes": NODES,
               **{f"extra_us_{state}": round(measure(case, state == "cold", rounds), 2) for state in ("hot", "cold")}}
        print(f"{row['case']:55s} hot {row['extra_us_hot']:6.2f} µs   cold {row['extra_us_cold']:6.2f} µs", flush=True)
        rows.append(row)
    result = {"threads": THREADS, "rounds": rounds, "flush_mb": FLUSH_FLOATS * 4 >> 20, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "online_ops.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Extra time per node of each online op (onnxruntime CPU, our kernels, {THREADS} threads; median over "
             f"{rounds} alternating runs of {NODES} nodes; cold = caches evicted by a "
             f"{result['flush_mb']} MB read in the same run).", "",
             "| op | hot µs | cold µs |", "|---|---|---|"]
    lines += [f"| {r['case']} | {r['extra_us_hot']:.2f} | {r['extra_us_cold']:.2f} |" for r in rows]
    (RESULTS / "online_ops.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
    main()
