// Pareto dynamic program over chain prefixes (see optimal_plan.h and memengine/plan.py): for
// each prefix, the plans that no other plan beats on both stored bytes and recompute cost. Every
// term of the memory model grows with the bytes stored before a segment, so a dominated prefix
// can never lead to a better complete plan; the result is optimal under the model.
#include "optimal_plan.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <limits>

namespace memengine::plan {
namespace {

struct Point {
  double stored, cost;
  int64_t start;     // first block of the last segment
  int policy;        // its policy
  int64_t previous;  // index of the prefix's point in frontier[start]
};

}  // namespace

std::optional<std::vector<SegmentChoice>> optimal_plan(int64_t n, const std::vector<double>& stored,
                                                       const std::vector<double>& peak, const std::vector<double>& cost,
                                                       double last_output, double budget) {
  const auto table_size = static_cast<size_t>(n * (n + 1) * 3);
  TORCH_CHECK_VALUE(n >= 1 && stored.size() == table_size && peak.size() == table_size && cost.size() == table_size,
                    "optimal_plan: tables must have n * (n + 1) * 3 entries");
  std::vector<std::vector<Point>> frontier(static_cast<size_t>(n + 1));
  frontier[0].push_back({0.0, 0.0, -1, -1, -1});
  std::vector<Point> candidates;
  for (int64_t end = 1; end <= n; ++end) {
    candidates.clear();
    for (int64_t start = 0; start < end; ++start) {
      const auto& points = frontier[static_cast<size_t>(start)];
      for (int policy = 0; policy < 3; ++policy) {
        const auto index = static_cast<size_t>((start * (n + 1) + end) * 3 + policy);
        const double room = budget - peak[index];
        for (size_t k = 0; k < points.size() && points[k].stored <= room; ++k) {  // sorted by stored
          candidates.push_back(
              {points[k].stored + stored[index], points[k].cost + cost[index], start, policy, static_cast<int64_t>(k)});
        }
      }
    }
    // Same order and tie-breaking as the Python version: by (stored, cost), stable.
    std::stable_sort(candidates.begin(), candidates.end(), [](const Point& a, const Point& b) {
      return a.stored < b.stored || (a.stored == b.stored && a.cost < b.cost);
    });
    auto& kept = frontier[static_cast<size_t>(end)];
    double best = std::numeric_limits<double>::infinity();
    for (const Point& p : candidates) {
      if (p.cost < best) {
        kept.push_back(p);
        best = p.cost;
      }
    }
  }
  const auto& last = frontier[static_cast<size_t>(n)];
  int64_t chosen = -1;
  for (size_t k = 0; k < last.size(); ++k) {
    if (last[k].stored + last_output <= budget &&
        (chosen < 0 || last[k].cost < last[static_cast<size_t>(chosen)].cost)) {
      chosen = static_cast<int64_t>(k);
    }
  }
  if (chosen < 0) return std::nullopt;
  std::vector<SegmentChoice> plan;
  for (int64_t end = n, index = chosen; end > 0;) {
    const Point& p = frontier[static_cast<size_t>(end)][static_cast<size_t>(index)];
    plan.push_back({p.start, end, p.policy});
    end = p.start;
    index = p.previous;
  }
  std::reverse(plan.begin(), plan.end());
  return plan;
}

}  // namespace memengine::plan
