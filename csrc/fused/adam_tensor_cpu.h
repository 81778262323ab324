// AdamTensor: one param's tensors and Adam constants, and the ways the fused CPU
// select-and-update (fused_cpu.cpp) applies the rule to them: one element, a range
// (the streaming loop, dense or masked), a list of tiles, a list of positions.
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/prefetched.h"
#include "common/rules.h"
#include "fused/scans_cpu.h"
#include "update/adam_stream_cpu.h"

namespace incrkern::fused {

// Listed tiles whose lines are requested before the first of them is updated: at low
// density the listed tiles lie far apart, and the update of one takes a few ns
// against a wait on memory for its lines.
constexpr int64_t kTileAhead = 32;

// One param's tensors and constants. With a residual r (error feedback), the
// gradient the rule reads is u = r + residual_alpha * g (residual_alpha: 1, or the
// mixed-precision unscale), kept in r; a chosen element's r becomes 0.
template <typename T>
struct AdamTensor {
  using M = at::opmath_type<T>;
  T* p;
  const T* g;
  M* m;
  M* v;
  M* r;  // null without error feedback
  AdamHyper<M> h;
  M step_size, bc2_sqrt, grad_scale, residual_alpha;
  // Where the keys are read without a residual: |g|, |p| (select="weight") or the
  // given `scores` (the Fisher of select="grad_sq", never negative: |s| orders as s).
  KeyFrom key_from = KeyFrom::Grad;
  const M* scores = nullptr;
  // select="grad_sq" with the Fisher's EMA formed by this call (else null): scores point
  // at it, and accumulate_keys forms f = fisher_decay * f + fisher_alpha * g^2 before
  // the keys are read. The rule reads g.
  M* fisher = nullptr;
  M fisher_decay = 0, fisher_alpha = 0;

  // The update of element e alone, by its residual (then zeroed) or its gradient.
  void one(int64_t e) const {
    M ge;
    if (r) {
      ge = r[e];
      r[e] = M(0);
    } else {
      ge = M(g[e]);
    }
    one_kept(e, ge);
  }

  // The update of element e by its gradient ge, kept apart from g (no residual).
  void one_kept(int64_t e, M ge) const {
    M pm = M(p[e]);
    adam_rule(pm, ge * grad_scale, m[e], v[e], h, step_size, bc2_sqrt);
    p[e] = T(pm);
  }

  // r = r + residual_alpha * g over [b, e), as accumulate_ computes it.
  void add_residual(int64_t b, int64_t e) const {
    fused::add_residual(r + b, g + b, residual_alpha, e - b);
  }

  // What the keys of [b, e) accumulate before they are read: error feedback's r += g
  // or the Fisher's EMA (nothing without either).
  void accumulate_keys(int64_t b, int64_t e) const {
    if (r) add_residual(b, e);
    else if (fisher) fused::add_fisher(fisher + b, g + b, fisher_alpha, fisher_decay, e - b);
  }

  // The keys where they are kept apart from g and p (the residual or the scores), else null.
  const M* stored_keys() const { return r ? r : scores; }

  // Where the keys are read without stored ones: p by |p|, else g.
  const T* own_keys() const { return key_from == KeyFrom::Param ? p : g; }

  // Every element of [b, e) updated: the streaming loop. With a residual it reads r
  // and zeroes it, having added g to it first unless `added` (the listing pass did).
  void dense(int64_t b, int64_t e, bool added = false) const {
    if (r && !added) add_residual(b, e);
    stream(b, e, nullptr);
  }

  // The elements of [b, e) whose byte chosen[j - b] is set updated by the masked
  // streaming loop (every element when chosen is null): every lane computed, the
  // unchosen written back as they were. With a residual it reads r (which holds
  // r + g) and zeroes the chosen entries.
  void stream(int64_t b, int64_t e, const uint8_t* chosen) const {
    stream_by(b, e, reinterpret_cast<const bool*>(chosen), false, 0);
  }

  // The elements of [b, e) whose key is >= at_least updated by the streaming loop
  // (fp32 and 16-bit types).
  void stream_at_least(int64_t b, int64_t e, uint64_t at_least) const {
    stream_by(b, e, nullptr, true, order_greater_than<false>(at_least));
  }

  // The streaming loop over [b, e): by a byte mask, by the key above above_gt, or every
  // element. With a residual it reads r (which holds r + g) and zeroes the chosen.
  void stream_by(int64_t b, int64_t e, const bool* mask, bool above, int32_t above_gt) const {
    if (r)
      adam_stream_isa<T, M, M>(p + b, r + b, m + b, v + b, mask, above, above_gt,
                               KeyFrom::Grad, nullptr, true, 0, e - b, h, step_size, bc2_sqrt,
                               grad_scale);
    else
      adam_stream_isa<T, T, M>(p + b, const_cast<T*>(g) + b, m + b, v + b, mask, above,
                               above_gt, key_from, scores ? scores + b : nullptr, false, 0,
                               e - b, h, step_size, bc2_sqrt, grad_scale);
  }

  // The keys of [b, b + len) above the band counted and those in it kept (band_keys):
  // the residual's (which holds r + g), the scores', p's or g's.
  int64_t count_band(int64_t b, int64_t len, int32_t lo_gt, int32_t hi_gt,
                     uint32_t*& out) const {
    if (r) return band_keys(static_cast<const float*>(r + b), len, lo_gt, hi_gt, out);
    if (scores) return band_keys(static_cast<const float*>(scores + b), len, lo_gt, hi_gt, out);
    return band_keys(key_from == KeyFrom::Param ? p + b : g + b, len, lo_gt, hi_gt, out);
  }

  // The p, gradient, m and v lines of the tile at s requested (to L2, as
  // update_cpu.cpp does).
  void fetch(int64_t s) const {
    request_line(p + s);
    if (r) request_line(r + s);
    else request_line(g + s);
    request_line(m + s);
    request_line(v + s);
  }

  // The p, m and v lines of element e requested (to L2): those the update writes, where
  // its score was just read.
  void fetch_written(int64_t e) const {
    request_line(p + e);
    request_line(m + e);
    request_line(v + e);
  }

  // tiles() over a list, the lines of each batch of kTileAhead tiles requested while
  // the batch before it is updated. With `vals` (no residual), the gradients of the
  // tiles updated lane by lane, in list order (adam_tiles): such a tile has no
  // gradient line requested or read.
  void tiles_ahead(const int64_t* starts, const uint32_t* masks, int64_t n,
                   const M* vals = nullptr) const {
    const auto request = [&](int64_t q) {
      if (vals && lanes_set(masks[q]) <= kLaneByLane) fetch_written(starts[q]);
      else fetch(starts[q]);
    };
    for (int64_t j = 0; j < std::min(n, kTileAhead); ++j) request(j);
    for (int64_t j = 0; j < n; j += kTileAhead) {
      const int64_t e = std::min(n, j + kTileAhead);
      for (int64_t q = e; q < std::min(n, e + kTileAhead); ++q) request(q);
      vals = tiles(starts + j, masks + j, e - j, vals);
    }
  }

  // The listed tiles (first element starts[j], chosen lanes masks[j], ascending)
  // updated as wholes by the masked streaming loop: every lane computed, the chosen
  // ones kept, the others written back as they were; `vals` as adam_tiles takes them,
  // returned past those used. fp32, bf16 and fp16 take the loops compiled per ISA.
  const M* tiles(const int64_t* starts, const uint32_t* masks, int64_t n,
                 const M* vals = nullptr) const {
    if (r)
      return adam_tiles_isa<T, M, M>(p, r, vals, m, v, true, starts, masks, n, kTileLanes, h,
                                     step_size, bc2_sqrt, grad_scale);
    return adam_tiles_isa<T, T, M>(p, const_cast<T*>(g), vals, m, v, false, starts, masks, n,
                                   kTileLanes, h, step_size, bc2_sqrt, grad_scale);
  }

  // The key of element e (after add_residual, with a residual).
  uint32_t key(int64_t e) const {
    if (r) return abs_key32(float(r[e]));
    if (scores) return abs_key32(float(scores[e]));
    return abs_key32(float(key_from == KeyFrom::Param ? p[e] : g[e]));
  }
};

}  // namespace incrkern::fused
