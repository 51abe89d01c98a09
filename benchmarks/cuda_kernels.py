#!/usr/bin/env python
"""CUDA kernel benchmark (issue 7): Hadamard bandwidth against a device-to-device copy and a dense
`x @ H` matmul, QMatMul TOPS against fp16 `torch.matmul` at prefill and decode shapes, the fused
Hadamard→quantize and ResidualCorrection kernels, and the online-op overhead of a W4A4 decoder layer
(LLaMA-3-8B shapes) with R3/R4/skip corrections vs without. Timings are CUDA-event medians.

One command on a GPU machine (builds librespin_cuda.so with nvcc first when it is missing; needs only
torch, numpy, cmake and nvcc — not the onnxruntime headers):

    python benchmarks/cuda_kernels.py                 # → benchmarks/results/cuda_kernels.{json,md}
    python benchmarks/cuda_kernels.py --smoke         # every code path on the CPU through the host
                                                      # emulation, tiny shapes, no timings kept

JSON: {"device", "copy_gbps", "online_overhead", "rows": [{"kernel", "shape", "dtype", "time_us",
"gbps", "frac_of_copy_bw", "tops", "speedup_vs_ref", ...}]}.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from rotations.hadamard import hadamard_factorization, normalized_hadamard  # noqa: E402
from runtime_ops import reference  # noqa: E402
from runtime_ops.cuda import DEVICE_LIBRARY, CudaKernels, HostKernels, KernelError, Launch  # noqa: E402

RESULTS = HERE / "results"


@dataclass(frozen=True)
class Shapes:
    """The problem sizes of one run (the GPU run, or the tiny smoke run)."""
    tokens: int                     # prefill tokens
    hadamard_sizes: tuple[int, ...]
    gemm: tuple[tuple[int, int], ...]  # (K, N) of the linears
    decode_tokens: tuple[int, ...]
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    rank: int
    past: int                       # KV length when decoding
    copy_mb: int
    reps: int


GPU = Shapes(tokens=2048, hadamard_sizes=(64, 128, 576, 1536, 4096, 11008, 14336), gemm=(
    (576, 1536), (1536, 576), (4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336), (14336, 4096)),
    decode_tokens=(1, 4, 16), hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=14336, rank=32,
    past=2048, copy_mb=1024, reps=50)
SMOKE = Shapes(tokens=9, hadamard_sizes=(12, 64, 86), gemm=((64, 96),), decode_tokens=(1, 5), hidden=64, heads=4,
               kv_heads=2, head_dim=16, intermediate=96, rank=8, past=7, copy_mb=1, reps=1)


class Runner:
    """Kernels, tensors and timers on the GPU (CUDA events) or, for --smoke, on the CPU."""

    def __init__(self, smoke: bool):
        self.smoke = smoke
        self.device = torch.device("cpu" if smoke else "cuda")
        self.kernels = HostKernels() if smoke else CudaKernels(DEVICE_LIBRARY)

    @property
    def stream(self) -> int:
        return 0 if self.smoke else torch.cuda.current_stream().cuda_stream

    def time_us(self, fn, reps: int) -> float:
        """Median microseconds of `fn` over `reps` runs after warm-ups."""
        if self.smoke:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e6
        for _ in range(3):
            fn()
        times = []
        for _ in range(reps):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) * 1e3)
        return statistics.median(times)

    def randn(self, *shape, dtype=torch.float32):
        return torch.randn(*shape, device=self.device).to(dtype)

    def codes(self, *shape, bits=4):
        half = 2 ** (bits - 1)
        return torch.randint(-half, half, shape, device=self.device, dtype=torch.int8)


def row(kernel: str, shape: str, dtype: str, time_us: float, nbytes: float = 0, copy_gbps: float = 0,
        ops: float = 0, ref_us: float | None = None, **extra) -> dict:
    gbps = nbytes / time_us / 1e3 if nbytes else None
    return {"kernel": kernel, "shape": shape, "dtype": dtype, "time_us": round(time_us, 3),
            "gbps": None if gbps is None else round(gbps, 1),
            "frac_of_copy_bw": None if gbps is None or not copy_gbps else round(gbps / copy_gbps, 3),
            "tops": round(ops / time_us / 1e6, 2) if ops else None,
            "speedup_vs_ref": None if ref_us is None else round(ref_us / time_us, 3), **extra}


def copy_bandwidth(r: Runner, s: Shapes) -> float:
    src = torch.empty(s.copy_mb << 20, dtype=torch.uint8, device=r.device)
    dst = torch.empty_like(src)
    t = r.time_us(lambda: dst.copy_(src), s.reps)
    return 2 * src.numel() / t / 1e3  # bytes read + written


def hadamard_rows(r: Runner, s: Shapes, copy_gbps: float) -> list[dict]:
    rows = []
    for n in s.hadamard_sizes:
        tokens = s.tokens * (s.heads if n <= 128 else 1)  # R3 sizes run once per head
        shape = f"[{tokens}, {n}]"
        if hadamard_factorization(n) is None:
            try:
                r.kernels.hadamard(0, 0, "float32", tokens, n, stream=r.stream)
            except KernelError as e:
                rows.append({"kernel": "hadamard", "shape": shape, "dtype": "-", "error": str(e)})
            continue
        H = normalized_hadamard(n, torch.float32).to(r.device)
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            name = str(dtype).removeprefix("torch.")
            x, y = r.randn(tokens, n, dtype=dtype), torch.empty(tokens, n, dtype=dtype, device=r.device)
            t = r.time_us(lambda: r.kernels.hadamard(x.data_ptr(), y.data_ptr(), name, tokens, n, stream=r.stream),
                          s.reps)
            Hd = H.to(dtype)
            ref = r.time_us(lambda: x @ Hd, s.reps) if dtype != torch.float32 or not r.smoke else None
            rows.append(row("hadamard", shape, name, t, 2 * x.numel() * x.element_size(), copy_gbps, ref_us=ref))
        x = r.randn(tokens, n)
        q = torch.empty(tokens, n, dtype=torch.int8, device=r.device)
        sc, zp = torch.empty(tokens, dtype=torch.float32, device=r.device), torch.empty(tokens, dtype=torch.int8,
                                                                                       device=r.device)
        t = r.time_us(lambda: r.kernels.quantize_rows(x.data_ptr(), "float32", tokens, n, True, 4, False, 1.0, False,
                                                      q.data_ptr(), sc.data_ptr(), zp.data_ptr(), stream=r.stream),
                      s.reps)
        rows.append(row("hadamard_quantize", shape, "float32→int4 codes", t, x.numel() * 5, copy_gbps))
    return rows


def qmatmul_operands(r: Runner, M: int, K: int, N: int):
    w = torch.from_numpy(reference.pack_int4(np.random.default_rng(K + N).integers(-8, 8, (N, K)).astype(np.int8)))
    return dict(xq=r.codes(M, K), x_scale=torch.rand(M, device=r.device), x_zp=r.codes(M),
                w=w.to(r.device), w_scale=torch.rand(N, device=r.device), w_zp=torch.zeros(N, dtype=torch.int8,
                                                                                           device=r.device),
                y=torch.empty(M, N, device=r.device))


def run_qmatmul(r: Runner, o: dict, M: int, K: int, N: int, variant: str) -> None:
    r.kernels.qmatmul(o["xq"].data_ptr(), o["x_scale"].data_ptr(), o["x_zp"].data_ptr(), o["w"].data_ptr(), 4,
                      o["w_scale"].data_ptr(), o["w_zp"].data_ptr(), 0, o["y"].data_ptr(), M, K, N, 0,
                      launch=Launch(variant=variant), stream=r.stream)


def qmatmul_rows(r: Runner, s: Shapes) -> list[dict]:
    rows = []
    for K, N in s.gemm:
        for tag, M in [("prefill", s.tokens)] + [("decode", m) for m in s.decode_tokens]:
            o = qmatmul_operands(r, M, K, N)
            a, b = r.randn(M, K, dtype=torch.float16), r.randn(K, N, dtype=torch.float16)
            ref = None if r.smoke else r.time_us(lambda: a @ b, s.reps)
            for variant in ("mma", "mma_small", "dp4a", "auto"):
                t = r.time_us(lambda: run_qmatmul(r, o, M, K, N, variant), s.reps)
                rows.append(row("qmatmul", f"{tag} M={M} K={K} N={N}", f"w4a4 {variant}", t,
                                ops=2 * M * K * N, ref_us=ref, nbytes=M * K + N * K / 2 + 4 * M * N))
    return rows


def correction_rows(r: Runner, s: Shapes, copy_gbps: float) -> list[dict]:
    rows = []
    for rank in sorted({s.rank, 4 * s.rank}):
        for M in (s.tokens, 1):
            D = s.hidden
            x, y = r.randn(M, D), torch.empty(M, D, device=r.device)
            Q, Mm = torch.linalg.qr(r.randn(D, rank))[0].contiguous(), r.randn(rank, rank) * 0.1
            t = r.time_us(lambda: r.kernels.residual_correction(x.data_ptr(), Q.data_ptr(), Mm.data_ptr(), 0,
                                                                y.data_ptr(), M, D, rank, stream=r.stream), s.reps)
            ref = r.time_us(lambda: x + ((x @ Q) @ Mm) @ Q.T, s.reps)
            rows.append(row("residual_correction", f"M={M} D={D} r={rank}", "float32", t, 8 * M * D, copy_gbps,
                            ref_us=ref))
    return rows


class DecoderLayer:
    """One W4A4KV4 LLaMA decoder layer out of our kernels plus torch (RMSNorm, SiLU, SDPA), as the
    ONNX export builds it: the online ops (R3 on Q, R3 on K fused into the KV-cache quantization, R4
    fused into the down_proj input quantization, two rank-r skip corrections fused with the residual
    adds) on or off — everything else identical."""

    def __init__(self, r: Runner, s: Shapes):
        self.r, self.s = r, s
        D, I, hd = s.hidden, s.intermediate, s.head_dim
        self.linears = {name: qmatmul_operands(r, 1, K, N) for name, (K, N) in {
            "q": (D, s.heads * hd), "k": (D, s.kv_heads * hd), "v": (D, s.kv_heads * hd), "o": (s.heads * hd, D),
            "gate": (D, I), "up": (D, I), "down": (I, D)}.items()}
        self.Q = torch.linalg.qr(r.randn(D, s.rank))[0].contiguous()
        self.M = r.randn(s.rank, s.rank) * 0.1

    def quantize(self, x: torch.Tensor, transform: bool = False, packed: bool = False):
        rows, n = x.numel() // x.shape[-1], x.shape[-1]
        q = torch.empty(*x.shape[:-1], (n + 1) // 2 if packed else n, dtype=torch.uint8 if packed else torch.int8,
                        device=x.device)
        sc = torch.empty(*x.shape[:-1], 1, device=x.device)
        zp = torch.empty(*x.shape[:-1], 1, dtype=torch.int8, device=x.device)
        self.r.kernels.quantize_rows(x.data_ptr(), "float32", rows, n, transform, 4, False, 1.0, packed, q.data_ptr(),
                                     sc.data_ptr(), zp.data_ptr(), stream=self.r.stream)
        return q, sc, zp

    def linear(self, name: str, xq) -> torch.Tensor:
        q, sc, zp = xq
        o = self.linears[name]
        M, K = q.numel() // q.shape[-1], q.shape[-1]
        N = o["w"].shape[0]
        y = torch.empty(M, N, device=q.device)
        self.r.kernels.qmatmul(q.data_ptr(), sc.data_ptr(), zp.data_ptr(), o["w"].data_ptr(), 4, o["w_scale"].data_ptr(),
                               o["w_zp"].data_ptr(), 0, y.data_ptr(), M, K, N, 0, stream=self.r.stream)
        return y

    def dequantize(self, q, sc, zp, d: int) -> torch.Tensor:
        y = torch.empty(*q.shape[:-1], d, device=q.device)
        self.r.kernels.dequantize_rows(q.data_ptr(), sc.data_ptr(), zp.data_ptr(), y.data_ptr(), q.numel() // q.shape[-1],
                                       d, True, stream=self.r.stream)
        return y

    def hadamard(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.empty_like(x)
        self.r.kernels.hadamard(x.data_ptr(), y.data_ptr(), "float32", x.numel() // x.shape[-1], x.shape[-1],
                                stream=self.r.stream)
        return y

    def residual(self, h: torch.Tensor, out: torch.Tensor, online: bool) -> torch.Tensor:
        """h + out, with the skip correction of h fused in (the exported graph's ResidualCorrection + Z)."""
        if not online:
            return h + out
        y = torch.empty_like(h)
        self.r.kernels.residual_correction(h.data_ptr(), self.Q.data_ptr(), self.M.data_ptr(), out.data_ptr(),
                                           y.data_ptr(), h.shape[0], h.shape[1], self.s.rank, stream=self.r.stream)
        return y

    def __call__(self, h: torch.Tensor, past_k, past_v, online: bool) -> torch.Tensor:
        s, T = self.s, h.shape[0]
        x = torch.nn.functional.rms_norm(h, (s.hidden,))
        xq = self.quantize(x)
        q = self.linear("q", xq).view(T, s.heads, s.head_dim)
        k = self.linear("k", xq).view(T, s.kv_heads, s.head_dim).contiguous()
        v = self.linear("v", xq).view(T, s.kv_heads, s.head_dim).contiguous()
        if online:
            q = self.hadamard(q)
        k = self.dequantize(*self.quantize(k, transform=online, packed=True), s.head_dim)  # the KV4 cache
        v = self.dequantize(*self.quantize(v, packed=True), s.head_dim)
        keys = torch.cat([past_k, k.transpose(0, 1)], dim=1) if past_k is not None else k.transpose(0, 1)
        values = torch.cat([past_v, v.transpose(0, 1)], dim=1) if past_v is not None else v.transpose(0, 1)
        attn = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1)[None], keys[None], values[None], is_causal=past_k is None, enable_gqa=True)
        h = self.residual(h, self.linear("o", self.quantize(attn[0].transpose(0, 1).reshape(T, -1).contiguous())),
                          online)
        x = torch.nn.functional.rms_norm(h, (s.hidden,))
        xq = self.quantize(x)
        a = (torch.nn.functional.silu(self.linear("gate", xq)) * self.linear("up", xq)).contiguous()
        return self.residual(h, self.linear("down", self.quantize(a, transform=online)), online)


def layer_overhead(r: Runner, s: Shapes) -> tuple[list[dict], dict]:
    layer = DecoderLayer(r, s)
    rows, overhead = [], {}
    for tag, T, past in (("prefill", s.tokens, 0), ("decode", 1, s.past)):
        h = r.randn(T, s.hidden)
        pk = r.randn(s.kv_heads, past, s.head_dim) if past else None
        pv = r.randn(s.kv_heads, past, s.head_dim) if past else None
        times = {}
        for online in (True, False):  # alternate to share drift between the two
            times[online] = r.time_us(lambda: layer(h, pk, pv, online), s.reps)
        for online in (True, False):
            rows.append(row("decoder_layer", f"{tag} T={T} past={past}", "w4a4kv4 " + ("online" if online else "plain"),
                            times[online]))
        overhead[tag] = round(times[True] / times[False] - 1, 4)
    return rows, overhead


def ensure_library() -> None:
    if DEVICE_LIBRARY.is_file():
        return
    build = DEVICE_LIBRARY.parent
    arch = "{}{}".format(*torch.cuda.get_device_capability())
    subprocess.run(["cmake", "-S", str(REPO / "kernels"), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                    "-DRESPIN_ORT=OFF", "-DRESPIN_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={arch}"], check=True)
    subprocess.run(["cmake", "--build", str(build), "--parallel", "--target", "respin_cuda", "respin_cuda_host"],
                   check=True)


def markdown(result: dict) -> str:
    lines = [f"Device: {result['device']}; device-to-device copy {result['copy_gbps']:.0f} GB/s "
             f"(bytes read + written); online overhead of a decoder layer: {result['online_overhead']}.", "",
             "| kernel | shape | dtype | µs | GB/s | of copy BW | TOPS | speed-up vs ref |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['shape']} | – | error: {r['error']} | | | | |")
            continue
        cells = [r["time_us"], r["gbps"], r["frac_of_copy_bw"], r["tops"], r["speedup_vs_ref"]]
        lines.append(f"| {r['kernel']} | {r['shape']} | {r['dtype']} | " + " | ".join("" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="run every path on the CPU (host emulation), tiny shapes")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/cuda_kernels.json)")
    args = parser.parse_args(argv)
    if not args.smoke:
        if not torch.cuda.is_available():
            print("error: no CUDA GPU here (torch.cuda.is_available() is False); --smoke runs the CPU emulation",
                  file=sys.stderr)
            return 2
        ensure_library()
    torch.manual_seed(0)
    r = Runner(args.smoke)
    s = SMOKE if args.smoke else GPU
    copy_gbps = copy_bandwidth(r, s)
    rows = hadamard_rows(r, s, copy_gbps) + qmatmul_rows(r, s) + correction_rows(r, s, copy_gbps)
    layer_rows, overhead = layer_overhead(r, s)
    result = {"device": "cpu (host emulation, --smoke)" if args.smoke else torch.cuda.get_device_name(),
              "copy_gbps": round(copy_gbps, 1), "online_overhead": overhead, "rows": rows + layer_rows}
    out = args.out or RESULTS / "cuda_kernels.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
