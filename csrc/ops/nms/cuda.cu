// NMS on CUDA. Boxes sorted by score are cut into blocks of 64; block pair (row, col) computes,
// for each box i of the row block, a 64-bit word whose bit j says "i suppresses box j of the col
// block". A single-block kernel then walks the row blocks in order, keeping the boxes no kept box
// has suppressed, and ORs the kept rows into the running "removed" mask. The mask never leaves
// the GPU; only the final kept indices are materialised. With class ids (batched_nms), boxes of
// different classes never suppress each other, which makes per-class NMS exact in one launch.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ops/nms/nms.h"

namespace fastdl::nms {
namespace {

constexpr int kBlock = 64;  // boxes per mask word

template <typename scalar_t>
__global__ void mask_kernel(int64_t n, const scalar_t* __restrict__ boxes,
                            const int64_t* __restrict__ classes, double threshold,
                            uint64_t* __restrict__ mask, int64_t words) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row_block = blockIdx.y, col_block = blockIdx.x;
  const int64_t i = row_block * kBlock + threadIdx.x;
  if (col_block < row_block) {  // boxes of earlier blocks come first: never suppressed by i
    if (i < n) mask[i * words + col_block] = 0;
    return;
  }
  __shared__ acc_t col[kBlock][5];
  __shared__ int64_t col_class[kBlock];
  const int64_t j_load = col_block * kBlock + threadIdx.x;
  if (j_load < n) {
    for (int d = 0; d < 4; ++d) col[threadIdx.x][d] = static_cast<acc_t>(boxes[j_load * 4 + d]);
    col[threadIdx.x][4] =
        (col[threadIdx.x][2] - col[threadIdx.x][0]) * (col[threadIdx.x][3] - col[threadIdx.x][1]);
    col_class[threadIdx.x] = classes != nullptr ? classes[j_load] : 0;
  }
  __syncthreads();
  if (i >= n) return;
  const acc_t x1 = boxes[i * 4], y1 = boxes[i * 4 + 1], x2 = boxes[i * 4 + 2],
              y2 = boxes[i * 4 + 3];
  const acc_t area = (x2 - x1) * (y2 - y1);
  const int64_t my_class = classes != nullptr ? classes[i] : 0;
  const int64_t cols = min(static_cast<int64_t>(kBlock), n - col_block * kBlock);
  uint64_t bits = 0;
  for (int64_t c = 0; c < cols; ++c) {
    const int64_t j = col_block * kBlock + c;
    if (j <= i || col_class[c] != my_class) continue;
    if (iou(x1, y1, x2, y2, area, col[c][0], col[c][1], col[c][2], col[c][3], col[c][4]) >
        static_cast<acc_t>(threshold)) {
      bits |= 1ULL << c;
    }
  }
  mask[i * words + col_block] = bits;
}

// One thread block. Thread 0 resolves the 64 boxes of the current block sequentially (a box is
// kept unless an earlier kept box removed it); then all threads fold the kept rows' masks into
// the later words of `removed`.
__global__ void keep_kernel(int64_t n, const uint64_t* __restrict__ mask, int64_t words,
                            uint64_t* __restrict__ removed, bool* __restrict__ keep) {
  __shared__ uint64_t kept_rows;
  for (int64_t b = 0; b < words; ++b) {
    if (threadIdx.x == 0) {
      uint64_t gone = removed[b], kept = 0;
      const int64_t rows = min(static_cast<int64_t>(kBlock), n - b * kBlock);
      for (int64_t r = 0; r < rows; ++r) {
        if ((gone >> r) & 1ULL) continue;
        kept |= 1ULL << r;
        keep[b * kBlock + r] = true;
        gone |= mask[(b * kBlock + r) * words + b];
      }
      kept_rows = kept;
    }
    __syncthreads();
    const uint64_t kept = kept_rows;
    for (int64_t w = b + 1 + threadIdx.x; w < words; w += blockDim.x) {
      uint64_t acc = removed[w];
      for (uint64_t rest = kept; rest != 0; rest &= rest - 1) {  // visit the set bits
        const int r = __ffsll(static_cast<long long>(rest)) - 1;
        acc |= mask[(b * kBlock + r) * words + w];
      }
      removed[w] = acc;
    }
    __syncthreads();
  }
}

at::Tensor nms_with_classes(const at::Tensor& boxes, const at::Tensor& scores,
                            const c10::optional<at::Tensor>& classes, double iou_threshold) {
  const c10::cuda::CUDAGuard guard(boxes.device());
  const int64_t n = boxes.size(0);
  if (n == 0) return at::empty({0}, boxes.options().dtype(at::kLong));
  const auto order = std::get<1>(scores.sort(/*stable=*/true, 0, /*descending=*/true));
  const auto sorted_boxes = boxes.index_select(0, order).contiguous();
  at::Tensor sorted_classes;
  if (classes) sorted_classes = classes->to(at::kLong).index_select(0, order).contiguous();
  const int64_t words = (n + kBlock - 1) / kBlock;
  auto mask = at::empty({n, words}, boxes.options().dtype(at::kLong));
  auto removed = at::zeros({words}, boxes.options().dtype(at::kLong));
  auto keep = at::zeros({n}, boxes.options().dtype(at::kBool));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes.scalar_type(), "nms_cuda", [&] {
    const dim3 grid(static_cast<unsigned int>(words), static_cast<unsigned int>(words));
    mask_kernel<scalar_t><<<grid, kBlock, 0, stream>>>(
        n, sorted_boxes.const_data_ptr<scalar_t>(),
        classes ? sorted_classes.const_data_ptr<int64_t>() : nullptr, iou_threshold,
        reinterpret_cast<uint64_t*>(mask.data_ptr<int64_t>()), words);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  keep_kernel<<<1, 256, 0, stream>>>(
      n, reinterpret_cast<const uint64_t*>(mask.const_data_ptr<int64_t>()), words,
      reinterpret_cast<uint64_t*>(removed.data_ptr<int64_t>()), keep.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return order.masked_select(keep);
}

at::Tensor nms_cuda(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold) {
  const double max_abs = check_inputs("nms", boxes, scores, iou_threshold, nullptr);
  return nms_with_classes(area_safe(boxes, max_abs), scores, c10::nullopt, iou_threshold);
}

at::Tensor batched_nms_cuda(const at::Tensor& boxes, const at::Tensor& scores,
                            const at::Tensor& idxs, double iou_threshold) {
  const double max_abs = check_inputs("batched_nms", boxes, scores, iou_threshold, &idxs);
  return nms_with_classes(area_safe(boxes, max_abs), scores, idxs, iou_threshold);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CUDA, m) {
  m.impl("nms", &nms_cuda);
  m.impl("batched_nms", &batched_nms_cuda);
}

}  // namespace fastdl::nms
