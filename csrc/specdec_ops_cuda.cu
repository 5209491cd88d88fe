// CUDA implementations of the specdec operators (schemas live in specdec_ops.cpp).
//
// tree_attention: one block per (query tile, query head, batch); one warp per query. Keys are
// processed in tiles of 32: the block stages a tile of K in shared memory, each lane scores one
// key of the tile, the warp folds the tile into its online softmax, and each lane accumulates its
// share of the head dimension from V. Tree keys are masked by the packed ancestor bits. K and V are
// read through their strides, so views of a preallocated cache are never copied.
//
// kv_compact: one block per (batch, head) of each cache tensor moves the kept rows in order; the
// kept slots are read on the device (no host round trip).

#include <ATen/Dispatch.h>
#include <cuda_runtime.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <cstdint>

#if __has_include(<c10/cuda/impl/cuda_cmake_macros.h>)  // torch built with CUDA: its device guard and stream
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define SPECDEC_DEVICE_GUARD(device) const c10::cuda::CUDAGuard device_guard(device)
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }
#else  // CPU-only torch headers lack c10/cuda's generated config: only compile checks land here
#define SPECDEC_DEVICE_GUARD(device) cudaSetDevice((device).index())
inline cudaStream_t current_stream() { return nullptr; }
#endif

#define SPECDEC_LAUNCH_CHECK()                                                           \
  do {                                                                                    \
    const cudaError_t status = cudaGetLastError();                                        \
    TORCH_CHECK(status == cudaSuccess, "specdec CUDA kernel launch failed: ", cudaGetErrorString(status)); \
  } while (0)

namespace specdec {

namespace {

constexpr int kWarp = 32;
constexpr int kQueriesPerBlock = 4;
constexpr int kMaxHeadDim = 256;
constexpr int kDimsPerLane = kMaxHeadDim / kWarp;

__device__ __forceinline__ float warp_max(float x) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, offset));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffff, x, offset);
  return x;
}

// K and V may be strided views (a preallocated cache narrowed to its held rows): only their last
// dimension must be contiguous. Strides in elements.
struct KVStrides {
  int64_t batch, head, row;
};

template <typename scalar_t>
__global__ void tree_attention_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                      const scalar_t* __restrict__ v, const uint64_t* __restrict__ ancestors,
                                      scalar_t* __restrict__ out, int q_heads, int kv_heads, int n, int seq,
                                      int d, int words, int prefix_len, float scale, KVStrides ks, KVStrides vs) {
  extern __shared__ float shared[];
  float* k_tile = shared;                                   // [kWarp][d + 1] (padded against bank conflicts)
  float* queries = shared + kWarp * (d + 1);                // [kQueriesPerBlock][d]
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int h = blockIdx.y, b = blockIdx.z;
  const int i = blockIdx.x * kQueriesPerBlock + warp;       // query slot of this warp
  const bool active = i < n;
  const int group = q_heads / kv_heads;
  const scalar_t* k_head = k + (int64_t)b * ks.batch + (int64_t)(h / group) * ks.head;
  const scalar_t* v_head = v + (int64_t)b * vs.batch + (int64_t)(h / group) * vs.head;
  float* query = queries + warp * d;
  if (active) {
    const scalar_t* q_row = q + (((int64_t)b * q_heads + h) * n + i) * d;
    for (int c = lane; c < d; c += kWarp) query[c] = static_cast<float>(q_row[c]) * scale;
  }
  float acc[kDimsPerLane];
#pragma unroll
  for (int t = 0; t < kDimsPerLane; ++t) acc[t] = 0.f;
  float running_max = -INFINITY, running_sum = 0.f;
  const uint64_t* anc_row = ancestors + (int64_t)(active ? i : 0) * words;

  for (int first = 0; first < seq; first += kWarp) {
    const int count = min(kWarp, seq - first);
    __syncthreads();  // the previous tile is no longer read
    for (int idx = threadIdx.x; idx < count * d; idx += blockDim.x) {
      const int row = idx / d, col = idx % d;
      k_tile[row * (d + 1) + col] = static_cast<float>(k_head[(int64_t)(first + row) * ks.row + col]);
    }
    __syncthreads();
    if (!active) continue;
    const int key = first + lane;
    bool visible = lane < count;
    if (visible && key >= prefix_len) {
      const int slot = key - prefix_len;
      visible = (anc_row[slot >> 6] >> (slot & 63)) & 1ULL;
    }
    float score = -INFINITY;
    if (visible) {
      float dot = 0.f;
      for (int c = 0; c < d; ++c) dot += query[c] * k_tile[lane * (d + 1) + c];
      score = dot;
    }
    const float tile_max = warp_max(score);
    if (tile_max == -INFINITY) continue;
    const float new_max = fmaxf(running_max, tile_max);
    const float correction = __expf(running_max - new_max);
    const float weight = visible ? __expf(score - new_max) : 0.f;
    running_sum = running_sum * correction + warp_sum(weight);
#pragma unroll
    for (int t = 0; t < kDimsPerLane; ++t) acc[t] *= correction;
    for (int j = 0; j < count; ++j) {
      const float w = __shfl_sync(0xffffffff, weight, j);
      if (w == 0.f) continue;
      const scalar_t* v_row = v_head + (int64_t)(first + j) * vs.row;
#pragma unroll
      for (int t = 0; t < kDimsPerLane; ++t) {
        const int c = lane + t * kWarp;
        if (c < d) acc[t] += w * static_cast<float>(v_row[c]);
      }
    }
    running_max = new_max;
  }
  if (!active) return;
  scalar_t* out_row = out + (((int64_t)b * n + i) * q_heads + h) * d;
  const float inv = 1.f / running_sum;
#pragma unroll
  for (int t = 0; t < kDimsPerLane; ++t) {
    const int c = lane + t * kWarp;
    if (c < d) out_row[c] = static_cast<scalar_t>(acc[t] * inv);
  }
}

template <typename scalar_t>
__global__ void kv_compact_kernel(scalar_t* data, int64_t stride_b, int64_t stride_h, int64_t stride_s, int heads,
                                  int d, int prefix_len, const int64_t* __restrict__ keep, int m) {
  const int64_t bh = blockIdx.x;
  scalar_t* base = data + (bh / heads) * stride_b + (bh % heads) * stride_h;
  // Rows move towards the prefix in increasing order; a row's source is never an earlier destination.
  for (int i = 0; i < m; ++i) {
    const int64_t src = keep[i];
    if (src != i) {
      for (int c = threadIdx.x; c < d; c += blockDim.x) {
        base[(prefix_len + i) * stride_s + c] = base[(prefix_len + src) * stride_s + c];
      }
    }
    __syncthreads();
  }
}

at::Tensor tree_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& ancestors, int64_t prefix_len, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && k.sizes() == v.sizes(),
              "tree_attention: q, k, v must be 4-D [B, H, len, D] with equal k and v shapes");
  TORCH_CHECK(q.size(3) <= kMaxHeadDim, "tree_attention (CUDA): head_dim must be <= ", kMaxHeadDim);
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "tree_attention: query heads must be a multiple of kv heads");
  TORCH_CHECK(k.size(2) == prefix_len + q.size(2), "tree_attention: keys must hold prefix_len + n positions");
  TORCH_CHECK(ancestors.scalar_type() == at::kLong && ancestors.dim() == 2 && ancestors.size(0) == q.size(2) &&
                  ancestors.size(1) * 64 >= q.size(2),
              "tree_attention: ancestors must be int64 [n, ceil(n / 64)]");
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda() && ancestors.is_cuda() && q.get_device() == k.get_device(),
              "tree_attention (CUDA): q, k, v and ancestors must be on the same CUDA device");
  SPECDEC_DEVICE_GUARD(q.device());
  // q is small (n rows): made contiguous; k and v stay strided views unless their rows are not.
  const auto qc = q.contiguous(), ac = ancestors.contiguous();
  const auto kc = k.stride(3) == 1 ? k : k.contiguous(), vc = v.stride(3) == 1 ? v : v.contiguous();
  auto out = at::empty({q.size(0), q.size(2), q.size(1), q.size(3)}, q.options());  // [B, n, Hq, D]
  if (q.numel() == 0) return out;
  const int n = q.size(2), d = q.size(3);
  const dim3 grid((n + kQueriesPerBlock - 1) / kQueriesPerBlock, q.size(1), q.size(0));
  const dim3 block(kWarp * kQueriesPerBlock);
  const size_t shared_bytes = sizeof(float) * (kWarp * (d + 1) + kQueriesPerBlock * d);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "tree_attention_cuda", [&] {
    tree_attention_kernel<scalar_t><<<grid, block, shared_bytes, current_stream()>>>(
        qc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(),
        reinterpret_cast<const uint64_t*>(ac.data_ptr<int64_t>()), out.data_ptr<scalar_t>(), q.size(1), k.size(1), n,
        k.size(2), d, ac.size(1), prefix_len, static_cast<float>(scale),
        KVStrides{kc.stride(0), kc.stride(1), kc.stride(2)}, KVStrides{vc.stride(0), vc.stride(1), vc.stride(2)});
  });
  SPECDEC_LAUNCH_CHECK();
  return out;
}

void kv_compact_cuda(at::TensorList keys, at::TensorList values, int64_t prefix_len, const at::Tensor& keep) {
  TORCH_CHECK(keys.size() == values.size(), "kv_compact: as many key as value tensors expected");
  TORCH_CHECK(keep.scalar_type() == at::kLong && keep.dim() == 1, "kv_compact: keep must be a 1-D int64 tensor");
  if (keys.empty() || keep.numel() == 0) return;
  SPECDEC_DEVICE_GUARD(keys[0].device());
  TORCH_CHECK(keep.device() == keys[0].device(), "kv_compact (CUDA): keep must be on the cache's device "
              "(a host tensor would need a blocking copy)");
  const auto keep_c = keep.contiguous();
  auto stream = current_stream();
  for (const at::TensorList& list : {keys, values}) {
    for (const auto& t : list) {
      TORCH_CHECK(t.dim() == 4 && t.stride(3) == 1, "kv_compact: cache tensors must be [B, H, S, D] with unit last stride");
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "kv_compact_cuda", [&] {
        kv_compact_kernel<scalar_t><<<t.size(0) * t.size(1), 128, 0, stream>>>(
            t.data_ptr<scalar_t>(), t.stride(0), t.stride(1), t.stride(2), t.size(1), t.size(3), prefix_len,
            keep_c.data_ptr<int64_t>(), keep_c.numel());
      });
      SPECDEC_LAUNCH_CHECK();
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(specdec, CUDA, m) {
  m.impl("tree_attention", &tree_attention_cuda);
  m.impl("kv_compact", &kv_compact_cuda);
}

}  // namespace specdec
