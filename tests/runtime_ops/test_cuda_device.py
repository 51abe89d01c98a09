"""The CUDA kernels on a real GPU (librespin_cuda.so), against their host emulation and the references.

Skipped, with the reason, where there is no CUDA GPU (torch.cuda) or no built GPU library — the
usual case here; tests/runtime_ops/test_cuda_host.py runs the same kernel programs on the CPU. On a
GPU the device results must equal the host emulation bit for bit (same programs, same float
operations), which ties the emulated tests to the hardware. The onnxruntime CUDA-EP path is tested
where an onnxruntime with CUDAExecutionProvider is installed.
"""

from __future__ import annotations

import numpy as np
import pytest

from runtime_ops import reference
from runtime_ops.cuda import DEVICE_LIBRARY, CudaKernels, HostKernels, Launch

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


@pytest.fixture(scope="module")
def device() -> CudaKernels:
    if not DEVICE_LIBRARY.is_file():
        pytest.skip(f"{DEVICE_LIBRARY} is not built (needs nvcc: python -m runtime_ops.build)")
    kernels = CudaKernels(DEVICE_LIBRARY)
    assert kernels.is_device
    return kernels


@pytest.fixture(scope="module")
def host() -> HostKernels:
    return HostKernels()


def on_gpu(a: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(a)).cuda()


def empty(shape, dtype):
    return torch.empty(shape, dtype=dtype, device="cuda")


def synced(*tensors) -> list[np.ndarray]:
    torch.cuda.synchronize()
    return [t.cpu().numpy() for t in tensors]


@pytest.mark.parametrize("n", [12, 64, 576, 1536, 4096, 14336, 32768])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_hadamard_on_gpu_equals_host(device, host, n, dtype):
    x = np.random.default_rng(n).standard_normal((5, n)).astype(dtype)
    xg, yg = on_gpu(x), empty(x.shape, getattr(torch, dtype))
    device.hadamard(xg.data_ptr(), yg.data_ptr(), dtype, 5, n)
    (y,) = synced(yg)
    np.testing.assert_array_equal(y, host.run_hadamard(x))


@pytest.mark.parametrize("n,transform,packed", [(64, True, True), (576, False, False), (1536, True, False)])
def test_quantize_on_gpu_equals_reference(device, n, transform, packed):
    x = np.random.default_rng(n).standard_normal((33, n)).astype(np.float32)
    width = (n + 1) // 2 if packed else n
    q = empty((33, width), torch.uint8 if packed else torch.int8)
    scale, zp = empty((33, 1), torch.float32), empty((33, 1), torch.int8)
    device.quantize_rows(on_gpu(x).data_ptr(), "float32", 33, n, transform, 4, False, 1.0, packed, q.data_ptr(),
                         scale.data_ptr(), zp.data_ptr())
    for a, e in zip(synced(q, scale, zp), host.run_quantize(x, bits=4, transform=transform, packed=packed), strict=True):
        np.testing.assert_array_equal(a, e)


@pytest.mark.parametrize("variant", ["mma", "mma_small", "dp4a"])
@pytest.mark.parametrize("M,K,N,group_size", [(1, 4096, 4096, 0), (16, 4096, 11008, 128), (2048, 576, 1536, 0)])
def test_qmatmul_on_gpu_is_bit_exact(device, variant, M, K, N, group_size):
    rng = np.random.default_rng(M + K + N)
    G = 1 if group_size == 0 else -(-K // group_size)
    xq = rng.integers(-8, 8, (M, K)).astype(np.int8)
    x_scale, x_zp = rng.random((M, 1)).astype(np.float32), rng.integers(-8, 8, (M, 1)).astype(np.int8)
    w = reference.pack_int4(rng.integers(-8, 8, (N, K)).astype(np.int8))
    w_scale, w_zp = rng.random((N, G)).astype(np.float32), np.zeros((N, G), np.int8)
    ins = [on_gpu(a) for a in (xq, x_scale, x_zp, w, w_scale, w_zp)]
    y = empty((M, N), torch.float32)
    device.qmatmul(ins[0].data_ptr(), ins[1].data_ptr(), ins[2].data_ptr(), ins[3].data_ptr(), 4, ins[4].data_ptr(),
                   ins[5].data_ptr(), 0, y.data_ptr(), M, K, N, group_size, launch=Launch(variant=variant))
    (got,) = synced(y)
    np.testing.assert_array_equal(got, reference.qmatmul(xq, x_scale, x_zp, w, w_scale, w_zp, None, K=K, bits=4,
                                                         group_size=group_size))


@pytest.mark.parametrize("D,r", [(576, 32), (4096, 128)])
def test_residual_correction_on_gpu_equals_host(device, host, D, r):
    rng = np.random.default_rng(D)
    x = rng.standard_normal((17, D)).astype(np.float32)
    Q = np.linalg.qr(rng.standard_normal((D, r)))[0].astype(np.float32)
    M = (rng.standard_normal((r, r)) * 0.1).astype(np.float32)
    xg, Qg, Mg, yg = on_gpu(x), on_gpu(Q), on_gpu(M), empty(x.shape, torch.float32)
    device.residual_correction(xg.data_ptr(), Qg.data_ptr(), Mg.data_ptr(), 0, yg.data_ptr(), 17, D, r)
    (y,) = synced(yg)
    np.testing.assert_array_equal(y, host.run_residual_correction(x, Q, M))


def test_onnxruntime_cuda_provider_runs_the_kernels():
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDAExecutionProvider (a CPU build)")
    from onnx import TensorProto, helper

    from runtime_ops.library import session_options
    from runtime_ops.schema import DOMAIN, OPSET_VERSION

    node = helper.make_node("Hadamard", ["X"], ["Y"], domain=DOMAIN, n=576, m=36)
    graph = helper.make_graph([node], "h", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [3, 576])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [3, 576])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, OPSET_VERSION)],
                              ir_version=10)
    options = session_options(True)
    options.log_severity_level = 0  # the placement log names the provider of every node
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CUDAExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((3, 576)).astype(np.float32)
    np.testing.assert_array_equal(session.run(None, {"X": x})[0], HostKernels().run_hadamard(x))
