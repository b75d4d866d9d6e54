// Argument validation shared by the CPU and CUDA entry points of the accumulate ops.
// Every message names the argument and says how to fix the call; all raise ValueError.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>  // at::has_internal_overlap

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace memengine {

// Bytes [begin, end) spanned by a tensor's elements (a superset of them when strided).
struct ByteSpan {
  uintptr_t begin, end;
};

inline ByteSpan byte_span(const at::Tensor& t) {
  int64_t last = 0;  // offset of the furthest element, in elements
  for (int64_t d = 0; d < t.dim(); ++d) {
    last += (t.size(d) - 1) * t.stride(d);
  }
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  return {begin, begin + static_cast<uintptr_t>((last + 1) * t.element_size())};
}

// True if a and b touch a common byte (judged by the ranges their elements span).
inline bool share_bytes(const at::Tensor& a, const at::Tensor& b) {
  if (a.storage().data() != b.storage().data()) {
    return false;
  }
  const ByteSpan x = byte_span(a), y = byte_span(b);
  return x.begin < y.end && y.begin < x.end;
}

inline bool is_supported_source_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
}

// A tensor a kernel writes must own each of its elements: with internal overlap (an expand()ed
// view) several outputs land on one element, a data race on CUDA and a wrong sum on the CPU.
inline void check_no_internal_overlap(const char* op, const at::Tensor& written, const std::string& name) {
  TORCH_CHECK_VALUE(at::has_internal_overlap(written) != at::MemOverlap::Yes, op, ": ", name,
                    " has elements that share memory (for example a view made by expand()); pass a tensor that owns "
                    "each element, e.g. ",
                    name, ".contiguous()");
}

// Validates one (dst, src) pair. `dst_name`/`src_name` are how the caller spells them
// ("dst" or "dsts[3]") so that errors point at the offending argument.
inline void check_accumulate_pair(const char* op, const at::Tensor& dst, const at::Tensor& src,
                                  const std::string& dst_name, const std::string& src_name) {
  TORCH_CHECK_VALUE(dst.defined() && src.defined(), op, ": ", dst_name, " and ", src_name, " must be tensors");
  TORCH_CHECK_VALUE(dst.scalar_type() == at::kFloat, op, ": ", dst_name,
                    " must be float32 (the fp32 gradient buffer), got ", dst.scalar_type(),
                    "; allocate it with dtype=torch.float32");
  TORCH_CHECK_VALUE(is_supported_source_dtype(src.scalar_type()), op, ": ", src_name,
                    " must be float32, bfloat16 or float16, got ", src.scalar_type(),
                    "; integer and complex tensors are not gradients memengine can accumulate");
  TORCH_CHECK_VALUE(src.device() == dst.device(), op, ": ", src_name, " is on ", src.device(), " but ", dst_name,
                    " is on ", dst.device(), "; move ", src_name, " to ", dst_name, "'s device");
  TORCH_CHECK_VALUE(src.sizes() == dst.sizes(), op, ": ", src_name, " has shape ", src.sizes(), " but ", dst_name,
                    " has shape ", dst.sizes(), "; shapes must match exactly (no broadcasting)");
  if (dst.numel() == 0) {
    return;
  }
  check_no_internal_overlap(op, dst, dst_name);
  const bool same_view =
      dst.data_ptr() == src.data_ptr() && dst.strides() == src.strides() && dst.scalar_type() == src.scalar_type();
  TORCH_CHECK_VALUE(same_view || !share_bytes(dst, src), op, ": ", dst_name, " and ", src_name,
                    " overlap in memory; pass a copy of ", src_name, " (", src_name, ".clone())");
}

// A scalar argument (alpha, scale) is either a Python float or, when given, a 0-dim float32
// tensor on the gradients' device (or on the CPU). `name` is how the op calls it.
inline void check_scalar_tensor(const char* op, const std::optional<at::Tensor>& tensor, const at::Device& device,
                                const char* name = "alpha") {
  if (!tensor.has_value() || !tensor->defined()) {
    return;
  }
  const at::Tensor& value = *tensor;
  TORCH_CHECK_VALUE(value.dim() == 0 && value.scalar_type() == at::kFloat, op, ": ", name,
                    " must be a Python float or a 0-dim float32 tensor, got a ", value.scalar_type(),
                    " tensor of shape ", value.sizes(), "; use ", name, ".reshape(()).float()");
  TORCH_CHECK_VALUE(value.device() == device || value.device().is_cpu(), op, ": ", name, " is on ", value.device(),
                    " but the gradients are on ", device, "; move ", name, " to ", device);
}

// Within one multi_accumulate_ call no destination may overlap another destination or another
// pair's source: the CUDA kernel processes all pairs concurrently. Checked in O(n log n) on
// the byte ranges the tensors span.
inline void check_multi_disjoint(const char* op, at::TensorList dsts, at::TensorList srcs) {
  struct Span {
    uintptr_t begin, end;
    size_t index;
  };
  std::vector<Span> spans;
  spans.reserve(dsts.size());
  for (size_t i = 0; i < dsts.size(); ++i) {
    const at::Tensor& t = dsts[i];
    if (!t.defined() || t.numel() == 0) {
      continue;
    }
    const ByteSpan span = byte_span(t);
    spans.push_back({span.begin, span.end, i});
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.begin < b.begin; });
  for (size_t k = 1; k < spans.size(); ++k) {
    TORCH_CHECK_VALUE(spans[k].begin >= spans[k - 1].end, op, ": dsts[", spans[k - 1].index, "] and dsts[",
                      spans[k].index, "] overlap in memory; every destination must be a separate region");
  }
  for (size_t j = 0; j < srcs.size(); ++j) {
    if (!srcs[j].defined() || srcs[j].numel() == 0) {
      continue;
    }
    const ByteSpan s = byte_span(srcs[j]);
    // The dst spans are disjoint, so sorted by begin they are sorted by end too.
    auto it = std::upper_bound(spans.begin(), spans.end(), s.begin,
                               [](uintptr_t value, const Span& span) { return value < span.end; });
    for (; it != spans.end() && it->begin < s.end; ++it) {
      TORCH_CHECK_VALUE(it->index == j, op, ": srcs[", j, "] overlaps dsts[", it->index,
                        "] in memory; pass a copy of srcs[", j, "]");
    }
  }
}

}  // namespace memengine
