// The "optimal" recompute planner's dynamic program (memengine/plan.py holds the memory model
// and a Python version of the same program; this one is what makes 128 blocks take well under
// a second).
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

namespace memengine::plan {

struct SegmentChoice {
  int64_t start, end;
  int policy;  // index into memengine.plan.POLICIES
};

// Segment tables are indexed [(start * (n + 1) + end) * 3 + policy]: the bytes a segment stores,
// the largest term of the memory model relative to the bytes stored before it, and its recompute
// cost. Returns the minimum-cost plan whose every term, and the end-of-forward term
// (all stored + last_output), stays within `budget`; nullopt if there is none.
std::optional<std::vector<SegmentChoice>> optimal_plan(int64_t n, const std::vector<double>& stored,
                                                       const std::vector<double>& peak, const std::vector<double>& cost,
                                                       double last_output, double budget);

}  // namespace memengine::plan
