// Greedy NMS on the CPU. Boxes are sorted by decreasing score (stable, so ties keep the lower
// index first) into structure-of-arrays form; each kept box then suppresses the boxes after it
// in one branch-free, vectorised pass, so every pair's IoU is computed at most once.
// batched_nms runs one such NMS per class, the classes in parallel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <numeric>
#include <vector>

#include "common/cpu_simd.h"
#include "ops/nms/nms.h"

namespace fastdl::nms {

// removed[j] |= IoU(box, boxes[j]) > threshold, for j in [0, count)
template <typename T>
inline void suppress_impl(int64_t count, T bx1, T by1, T bx2, T by2, T barea,
                          const T* __restrict x1, const T* __restrict y1, const T* __restrict x2,
                          const T* __restrict y2, const T* __restrict area, T threshold,
                          uint8_t* __restrict removed) {
  for (int64_t j = 0; j < count; ++j) {
    removed[j] |= iou(bx1, by1, bx2, by2, barea, x1[j], y1[j], x2[j], y2[j], area[j]) > threshold;
  }
}

void suppress(int64_t count, float bx1, float by1, float bx2, float by2, float barea,
              const float* x1, const float* y1, const float* x2, const float* y2, const float* area,
              float threshold, uint8_t* removed) {
  cpu::simd_dispatch([=] {
    suppress_impl(count, bx1, by1, bx2, by2, barea, x1, y1, x2, y2, area, threshold, removed);
  });
}
void suppress(int64_t count, double bx1, double by1, double bx2, double by2, double barea,
              const double* x1, const double* y1, const double* x2, const double* y2,
              const double* area, double threshold, uint8_t* removed) {
  cpu::simd_dispatch([=] {
    suppress_impl(count, bx1, by1, bx2, by2, barea, x1, y1, x2, y2, area, threshold, removed);
  });
}

namespace {

// Greedy NMS over the boxes at positions order[0..n) (already in score order); sets
// keep[position] for the survivors.
template <typename T>
void nms_sorted(const T* boxes, const int64_t* order, int64_t n, T threshold, uint8_t* keep) {
  std::vector<T> x1(n), y1(n), x2(n), y2(n), area(n);
  for (int64_t i = 0; i < n; ++i) {
    const T* b = boxes + 4 * order[i];
    x1[i] = b[0], y1[i] = b[1], x2[i] = b[2], y2[i] = b[3];
    area[i] = (x2[i] - x1[i]) * (y2[i] - y1[i]);
  }
  std::vector<uint8_t> removed(n, 0);
  for (int64_t i = 0; i < n; ++i) {
    if (removed[i]) continue;
    keep[i] = 1;
    suppress(n - i - 1, x1[i], y1[i], x2[i], y2[i], area[i], x1.data() + i + 1, y1.data() + i + 1,
             x2.data() + i + 1, y2.data() + i + 1, area.data() + i + 1, threshold,
             removed.data() + i + 1);
  }
}

at::Tensor score_order(const at::Tensor& scores) {
  return std::get<1>(scores.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true));
}

at::Tensor nms_cpu(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold) {
  const double max_abs = check_inputs("nms", boxes, scores, iou_threshold, nullptr);
  const int64_t n = boxes.size(0);
  if (n == 0) return at::empty({0}, boxes.options().dtype(at::kLong));
  const auto order = score_order(scores).contiguous();
  const auto boxes_c = area_safe(boxes, max_abs).contiguous();
  auto keep = at::zeros({n}, boxes.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES(boxes.scalar_type(), "nms_cpu", [&] {
    nms_sorted<scalar_t>(boxes_c.const_data_ptr<scalar_t>(), order.const_data_ptr<int64_t>(), n,
                         static_cast<scalar_t>(iou_threshold), keep.data_ptr<uint8_t>());
  });
  return order.masked_select(keep.to(at::kBool));
}

at::Tensor batched_nms_cpu(const at::Tensor& boxes, const at::Tensor& scores,
                           const at::Tensor& idxs, double iou_threshold) {
  const double max_abs = check_inputs("batched_nms", boxes, scores, iou_threshold, &idxs);
  const int64_t n = boxes.size(0);
  if (n == 0) return at::empty({0}, boxes.options().dtype(at::kLong));
  const auto order = score_order(scores);
  // Group by class, keeping score order inside each class (stable sort on the class id).
  const auto classes_in_order = idxs.to(at::kLong).index_select(0, order);
  const auto by_class = std::get<1>(classes_in_order.sort(/*stable=*/true, 0, false)).contiguous();
  const auto grouped_order = order.index_select(0, by_class).contiguous();
  const auto grouped_classes = classes_in_order.index_select(0, by_class).contiguous();
  const int64_t* cls = grouped_classes.const_data_ptr<int64_t>();
  std::vector<int64_t> starts{0};
  for (int64_t i = 1; i < n; ++i) {
    if (cls[i] != cls[i - 1]) starts.push_back(i);
  }
  starts.push_back(n);
  const auto boxes_c = area_safe(boxes, max_abs).contiguous();
  std::vector<uint8_t> keep(n, 0);  // indexed by position in grouped_order
  AT_DISPATCH_FLOATING_TYPES(boxes.scalar_type(), "batched_nms_cpu", [&] {
    const int64_t groups = static_cast<int64_t>(starts.size()) - 1;
    at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        nms_sorted<scalar_t>(boxes_c.const_data_ptr<scalar_t>(),
                             grouped_order.const_data_ptr<int64_t>() + starts[g],
                             starts[g + 1] - starts[g], static_cast<scalar_t>(iou_threshold),
                             keep.data() + starts[g]);
      }
    });
  });
  // Survivors back in global score order: mark them by their rank in `order`.
  std::vector<uint8_t> kept_at_rank(n, 0);
  const int64_t* rank_of = by_class.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    if (keep[i]) kept_at_rank[rank_of[i]] = 1;
  }
  const auto mask = at::from_blob(kept_at_rank.data(), {n}, at::kByte).to(at::kBool);
  return order.masked_select(mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CPU, m) {
  m.impl("nms", &nms_cpu);
  m.impl("batched_nms", &batched_nms_cpu);
}

}  // namespace fastdl::nms
