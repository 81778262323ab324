// Parallel loops whose work is claimed, not split: each thread takes the next run
// of indices when it comes free, where at::parallel_for gives every thread an equal
// share up front and the call then waits on the slowest. The threads of a pass are
// not equally fast: on the 2-vCPU Intel machine the calling thread ran the listing
// pass over one large tensor slower than the other, whichever blocks it took
// (docs/measurements.md, "Where the cores wait").
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace incrkern {

// The runs of `grain` (>= 1) indices of [begin, end), in order, each handed out once.
class Claims {
 public:
  Claims(int64_t begin, int64_t end, int64_t grain) : end_(end), grain_(grain), next_(begin) {}
  // The next unclaimed run into [b, e); false once none is left.
  bool next(int64_t& b, int64_t& e) {
    b = next_.fetch_add(grain_, std::memory_order_relaxed);
    if (b >= end_) return false;
    e = std::min(end_, b + grain_);
    return true;
  }
  // The next unclaimed index alone, whatever the grain; false once none is left.
  bool next_index(int64_t& i) {
    i = next_.fetch_add(1, std::memory_order_relaxed);
    return i < end_;
  }

 private:
  const int64_t end_, grain_;
  std::atomic<int64_t> next_;
};

// work() once on each of min(runs, at::get_num_threads()) threads (none when runs is
// 0), for work that claims its own runs.
template <typename Work>
void on_threads(int64_t runs, Work&& work) {
  at::parallel_for(0, std::min<int64_t>(runs, at::get_num_threads()), 1,
                   [&](int64_t t0, int64_t t1) {
                     for (int64_t t = t0; t < t1; ++t) work();
                   });
}

// work(claims) once on each thread (as many as there are runs, at most
// at::get_num_threads()), which loops over claims.next(): for a pass whose threads
// each set up scratch space first.
template <typename Work>
void parallel_claims(int64_t begin, int64_t end, int64_t grain, Work&& work) {
  if (end <= begin) return;
  grain = std::max<int64_t>(1, grain);
  Claims claims(begin, end, grain);
  on_threads((end - begin + grain - 1) / grain, [&] { work(claims); });
}

// at::parallel_for(begin, end, grain, fn), fn called on each claimed run.
template <typename Fn>
void parallel_for_claimed(int64_t begin, int64_t end, int64_t grain, Fn&& fn) {
  parallel_claims(begin, end, grain, [&](Claims& claims) {
    for (int64_t b, e; claims.next(b, e);) fn(b, e);
  });
}

}  // namespace incrkern
