"""The NumPy references agree with the torch simulated-quant model and with plain float maths."""

import math

import numpy as np
import pytest
import torch

from converter.quantization.fake_quant import ActQuantSpec, quantize_dequantize
from rotations.hadamard import hadamard_matrix, hadamard_transform, walsh_hadamard_transform
from runtime_ops import reference as ref

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("n", [1, 8, 12, 20, 36, 64, 96, 576, 1536])
def test_hadamard_is_x_h_over_sqrt_n_and_matches_torch(n):
    x = RNG.standard_normal((3, 5, n)).astype(np.float32)
    from rotations.hadamard import hadamard_factorization

    m = hadamard_factorization(n)[1]
    y = ref.hadamard(x, n, m)
    expected = x.astype(np.float64) @ hadamard_matrix(n).numpy() / math.sqrt(n)
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(hadamard_transform(torch.from_numpy(x)).numpy(), y, rtol=0, atol=1e-5)
    # the op is the inverse of walsh_hadamard_transform (they differ where H_m is not symmetric)
    back = walsh_hadamard_transform(torch.from_numpy(y).double()).numpy()
    np.testing.assert_allclose(back, x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("clip", [1.0, 0.9])
def test_dynamic_quantize_is_bit_exact_with_the_simulated_quant_model(bits, clip):
    x = (RNG.standard_normal((4, 7, 96)) * RNG.uniform(0.01, 30, (4, 7, 1))).astype(np.float32)
    x[0, 0] = 0.0  # an all-zero token
    x[1, 1] = np.abs(x[1, 1])  # all positive: the range still holds 0
    q, scale, zp = ref.dynamic_quantize(x, bits=bits, clip=clip)
    half = 2 ** (bits - 1)
    assert q.dtype == np.int8 and q.min() >= -half and q.max() <= half - 1
    assert scale.shape == (4, 7, 1) and zp.shape == (4, 7, 1) and zp.dtype == np.int8
    sim = quantize_dequantize(torch.from_numpy(x), ActQuantSpec(bits, clip=clip)).numpy()
    np.testing.assert_array_equal(ref.dequantize(q, scale, zp), sim)
    np.testing.assert_array_equal(ref.dequantize(q[0, 0], scale[0, 0], zp[0, 0]), 0.0)


@pytest.mark.parametrize("bits", [4, 8])
def test_symmetric_dynamic_quantize_matches_the_simulated_quant_model(bits):
    x = RNG.standard_normal((5, 33)).astype(np.float32)
    q, scale, zp = ref.dynamic_quantize(x, bits=bits, symmetric=1)
    assert not zp.any()
    sim = quantize_dequantize(torch.from_numpy(x), ActQuantSpec(bits, symmetric=True)).numpy()
    np.testing.assert_array_equal(ref.dequantize(q, scale, zp), sim)


@pytest.mark.parametrize("k", [1, 2, 7, 64, 65])
def test_int4_packing_round_trips_low_nibble_first(k):
    q = RNG.integers(-8, 8, (3, k)).astype(np.int8)
    packed = ref.pack_int4(q)
    assert packed.dtype == np.uint8 and packed.shape == (3, (k + 1) // 2)
    assert packed[0, 0] & 0x0F == q[0, 0] + 8
    np.testing.assert_array_equal(ref.unpack_int4(packed, k), q)
    with pytest.raises(ValueError):
        ref.pack_int4(np.array([8], np.int8))


@pytest.mark.parametrize("K,group_size", [(96, 0), (96, 32), (100, 32), (37, 0), (37, 16)])
@pytest.mark.parametrize("bits", [4, 8])
def test_qmatmul_equals_the_float_matmul_of_dequantized_operands(K, group_size, bits):
    N = 11
    x = RNG.standard_normal((2, 3, K)).astype(np.float32)
    xq, xs, xz = ref.dynamic_quantize(x, bits=8)
    G = -(-K // (group_size or K))
    half = 2 ** (bits - 1)
    wq = RNG.integers(-half, half, (N, K)).astype(np.int8)
    ws = RNG.uniform(0.01, 0.1, (N, G)).astype(np.float32)
    wz = RNG.integers(-2, 3, (N, G)).astype(np.int8)
    bias = RNG.standard_normal(N).astype(np.float32)
    w = ref.pack_int4(wq) if bits == 4 else wq
    y = ref.qmatmul(xq, xs, xz, w, ws, wz, bias, K=K, bits=bits, group_size=group_size)
    cols = np.minimum(np.arange(K) // (group_size or K), G - 1)
    w_float = (wq.astype(np.float64) - wz[:, cols]) * ws[:, cols]
    expected = ref.dequantize(xq, xs, xz).astype(np.float64) @ w_float.T + bias
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_residual_correction_applies_the_low_rank_transition():
    D, r = 24, 5
    Q, _ = np.linalg.qr(RNG.standard_normal((D, r)))
    M = RNG.standard_normal((r, r))
    x = RNG.standard_normal((2, 4, D)).astype(np.float32)
    expected = x @ (np.eye(D) + Q @ M @ Q.T)
    np.testing.assert_allclose(ref.residual_correction(x, Q.astype(np.float32), M.astype(np.float32)), expected,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_kv_quantization_round_trips_to_the_simulated_quant_cache(bits):
    k = RNG.standard_normal((1, 3, 9, 64)).astype(np.float32) * 4
    q, scale, zp = ref.quantize_kv(k, bits)
    assert q.shape[-1] == (32 if bits == 4 else 64)
    sim = quantize_dequantize(torch.from_numpy(k), ActQuantSpec(bits)).numpy()
    np.testing.assert_array_equal(ref.dequantize_kv(q, scale, zp, bits, 64), sim)
