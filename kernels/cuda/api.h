/* The C entry points of the respin CUDA kernels, on raw pointers (kernels/cuda/).
 *
 * Two libraries export exactly these functions:
 *   librespin_cuda.so       (nvcc) the GPU kernels: pointers are device memory, `stream` a cudaStream_t
 *                           (NULL: the default stream); calls are asynchronous on that stream.
 *   librespin_cuda_host.so  (g++)  the same kernel programs run on the CPU over every block and
 *                           thread index (exec.cuh): pointers are host memory, `stream` is ignored.
 * The onnxruntime CUDA-EP ops (ort_cuda_ops.cc) call them with the EP's stream; the tests call the
 * host library through ctypes, the GPU tests and benchmarks/cuda_kernels.py the device one.
 *
 * Every function returns 0 on success, or a nonzero code with respin_cuda_last_error() saying what
 * was wrong (bad sizes are checked before anything is launched). `launch` may be NULL (the
 * launcher's choice) or override the launch shape, which the tests use to cover several.
 * Layouts and arithmetic: runtime_ops/schema.py (row-major, any leading dims folded into rows).
 */
#ifndef RESPIN_CUDA_API_H_
#define RESPIN_CUDA_API_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum RespinDType { RESPIN_FLOAT32 = 0, RESPIN_FLOAT16 = 1, RESPIN_BFLOAT16 = 2 };

enum RespinQMatMulVariant {
  RESPIN_QMATMUL_AUTO = 0,
  RESPIN_QMATMUL_MMA = 1,       /* int8 tensor cores (mma.sync m16n8k32), 64×128 block tiles */
  RESPIN_QMATMUL_MMA_SMALL = 2, /* int8 tensor cores, 16×64 block tiles (few tokens) */
  RESPIN_QMATMUL_DP4A = 3       /* CUDA cores (__dp4a), one warp per output column */
};

typedef struct RespinLaunch {
  int threads;        /* threads per block (a multiple of 32), 0: default */
  int rows_per_block; /* row kernels: rows a block holds (a power of two), 0: default */
  int variant;        /* QMatMul: a RespinQMatMulVariant */
} RespinLaunch;

const char* respin_cuda_last_error(void);

/* 1 when this library runs on a GPU (librespin_cuda.so), 0 for the host emulation. */
int respin_cuda_is_device(void);

/* Y = X·H_n/√n along the last axis; x, y [rows, n] of `dtype` (float32 accumulation). */
int respin_hadamard(const void* x, void* y, int dtype, int64_t rows, int n, const RespinLaunch* launch,
                    void* stream);

/* Per-row dynamic quantization of x [rows, n] (dtype), after the Hadamard transform when `transform`:
 * q int8 [rows, n], or uint8 [rows, ⌈n/2⌉] with two 4-bit codes a byte when `packed` (bits 4);
 * scale float32 [rows], zero_point int8 [rows]. DynamicQuantize, QuantizeKV and their fusions. */
int respin_quantize_rows(const void* x, int dtype, int64_t rows, int n, int transform, int bits, int symmetric,
                         float clip, int packed, void* q, float* scale, int8_t* zero_point,
                         const RespinLaunch* launch, void* stream);

/* y [rows, d] = (q − zero_point)·scale from int8 codes [rows, d] or packed nibbles [rows, ⌈d/2⌉]. */
int respin_dequantize_rows(const void* q, const float* scale, const int8_t* zero_point, float* y, int64_t rows,
                           int d, int packed, const RespinLaunch* launch, void* stream);

/* QMatMul: y [M, N] from xq int8 [M, K] (x_scale, x_zero_point [M]) and w (packed uint8 [N, ⌈K/2⌉]
 * when bits = 4, int8 [N, K] when bits = 8) with w_scale / w_zero_point [N, G]; bias [N] or NULL. */
int respin_qmatmul(const int8_t* xq, const float* x_scale, const int8_t* x_zero_point, const void* w, int bits,
                   const float* w_scale, const int8_t* w_zero_point, const float* bias, float* y, int64_t M,
                   int K, int N, int group_size, const RespinLaunch* launch, void* stream);

/* y [rows, D] = (x + ((x·Q)·M)·Qᵀ) + z, Q [D, r], M [r, r], r ≤ 128; z [rows, D] or NULL. */
int respin_residual_correction(const float* x, const float* Q, const float* M, const float* z, float* y,
                               int64_t rows, int D, int r, const RespinLaunch* launch, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* RESPIN_CUDA_API_H_ */
