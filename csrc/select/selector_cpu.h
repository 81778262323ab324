// CPU selection, part 4: the Selector, which finds the k largest keys of a list of
// sources (one tensor, or the concatenation of several) and writes their positions.
//
// The element chosen last, e* = the k-th under (key descending, position ascending),
// defines the answer: an element is chosen iff key > T or (key == T and pos <= I),
// with (T, I) = (key, position) of e*. Selector::run() tries, in order:
//
//  - run_tile_max (inputs of up to kTileMaxNumel = 2^20 elements, k at most half
//    the number of 16-element tiles, i.e. density up to about 3%): the largest key
//    of every tile, T = the k-th largest tile maximum (from a TopBitsHistogram
//    counted during the read), then the keys >= T of the tiles whose maximum
//    reaches T. Exact, one read from memory.
//  - run_filter (inputs of up to one block, denser): a sample's lower bound L on the
//    k-th key, one read keeping the keys >= L. Exact when at least k keys pass.
//  - run_serial (up to kSerialMax elements): every key in a vector, nth_element.
//  - the sampled band (sample_band, band_pass, resolve_and_merge): a constant-stride
//    sample bounds the k-th key from above (H) and below (L) with four standard
//    deviations of margin; one pass keeps, per block, the winners (key > H) and the
//    candidates (L <= key <= H). When #winners < k <= #winners + #candidates, e* is
//    the (k - #winners)-th candidate and each block merges its winners with its
//    chosen candidates. approx accepts a band that misses k by at most 1%.
//  - tie_guess: when the sample shows a tie mass in the band (few distinct values),
//    its k-th key is tried as the answer and one counting pass confirms it.
//  - run_radix (exact fallback, any input): per-thread histograms of 11-bit digits,
//    most significant first, until the bucket of the k-th is wholly chosen, holds one
//    key (ties, taken lowest positions first), or is small enough for a band pass.
//    Its passes over the input (digit_histogram, final_pass) are in radix_cpu.h.
//
// Positions are int64 everywhere (tensors beyond 2^31 elements). The scores are
// computed from the inputs on the fly; no score tensor is ever materialised.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#include "common/prefetched.h"
#include "select/kth_cpu.h"
#include "select/radix_cpu.h"
#include "select/scan_cpu.h"

namespace incrkern::select {

constexpr int64_t kSerialMax = int64_t(1) << 15;  // below: one thread, nth_element
constexpr int64_t kSample = int64_t(1) << 16;
constexpr int64_t kMinSample = int64_t(1) << 12;
constexpr int64_t kSampleSpacing = 256;  // elements per sampled key, between those bounds
// From this many elements per chosen one (density 0.2% and under), the band's sample
// takes a key per 2 * kSampleSpacing elements (sample_band).
constexpr int64_t kSparseSampleRatio = 500;
constexpr int kDigitBits = 11;

// setup.py builds with -fopenmp, so at::parallel_for (an OpenMP pragma in a header)
// spreads the blocks over at::get_num_threads() threads.
using at::parallel_for;

template <typename K>
struct Cand {
  K key;
  int64_t pos;  // position in the concatenation
};

template <typename K>
inline bool before(const Cand<K>& a, const Cand<K>& b) {
  return a.key > b.key || (a.key == b.key && a.pos < b.pos);
}

// Per block results of a band pass.
template <typename K>
struct BandOut {
  std::vector<int64_t> win;   // local positions with key > H, ascending
  std::vector<K> ckey;        // candidates L <= key <= H, ascending positions
  std::vector<int64_t> cidx;
};

template <typename K>
class Selector {
 public:
  Selector(std::vector<Source> srcs, int64_t k, bool approx) : srcs_(std::move(srcs)), k_(k), approx_(approx) {
    for (const Source& s : srcs_) n_ += s.n;
    blocks_ = blocks_of(srcs_);
    // The band's candidates, up to n/16: its 64K-key sample predicts about 1% of n at
    // k = 10%, and a cap under that (2^23 had been) sent such selections of more than
    // about 4e8 elements to the radix passes, several reads instead of one.
    budget_ = std::clamp<int64_t>(n_ / 16, int64_t(1) << 16, int64_t(1) << 26);
  }

  // One int64 tensor of ascending local positions per source.
  std::vector<at::Tensor> run() {
    tie_guess_.reset();
    if (k_ == 0) return finish_empty();
    if (k_ == n_) return finish_all();
    if (tile_max_fits(n_, k_)) return run_tile_max();
    if (n_ <= kBlock)
      if (auto out = run_filter()) return std::move(*out);
    if (n_ <= kSerialMax) return run_serial();
    if (auto band = sample_band()) {
      std::vector<BandOut<K>> out;
      if (band_pass(band->first, band->second, 2 * budget_, out)) {
        int64_t w = 0, c = 0;
        for (const auto& b : out) w += int64_t(b.win.size()), c += int64_t(b.cidx.size());
        if (w < k_ && k_ <= w + c) return resolve_and_merge(out, k_ - w);
        if (approx_) {
          const int64_t tol = tolerance(k_);
          if (w >= k_ && w - k_ <= tol) return merge_all(out, false);
          if (w + c < k_ && k_ - (w + c) <= tol) return merge_all(out, true);
        }
      }
    }
    if (tie_guess_) {  // one counting pass checks whether the guess is the k-th key
      const FinalCounts c = final_counts(srcs_, blocks_, *tie_guess_);
      int64_t gt = 0, eq = 0;
      for (size_t b = 0; b < c.greater.size(); ++b) gt += c.greater[b], eq += c.equal[b];
      if (gt < k_ && k_ <= gt + eq) return final_write(srcs_, blocks_, *tie_guess_, k_ - gt, c);
    }
    return run_radix();
  }

  // The approximate mode's accepted miss: 1% of k, at least 1.
  static int64_t tolerance(int64_t k) { return std::max<int64_t>(1, k / 100); }

  // After a sample_band: the fraction of the sampled keys that are 0.
  double sampled_zeros() const { return sampled_zeros_; }

  // Whether sample_band takes a key per 2 * kSampleSpacing elements (density 0.2%
  // and under), not per kSampleSpacing.
  bool sparse_sample() const { return k_ * kSparseSampleRatio <= n_; }

  // Whether at most `most` of s keys at sample_keys' stride are nonzero. It reads them
  // in order and stops at the first past that: a tensor of few zeros costs a few
  // reads, each a wait on its own line.
  bool few_nonzeros(int64_t s, int64_t most) const {
    s = std::clamp<int64_t>(s, 1, n_);
    const auto [start, step] = sample_stride(s);
    int64_t nonzeros = 0;
    for (const Source& src : srcs_)
      with_reader<K>(src, [&](auto rd) {
        for (int64_t at = start, j = 0; j < s && nonzeros <= most; ++j, at += step)
          if (at >= src.pos0 && at < src.pos0 + src.n) nonzeros += rd(at - src.pos0) != K(0);
      });
    return nonzeros <= most;
  }

  // After a sample_band that found the band too wide: the sample's k-th key.
  std::optional<K> tie_guess() const { return tie_guess_; }

 private:
  std::vector<Source> srcs_;
  int64_t k_, n_ = 0, budget_;
  bool approx_;
  std::vector<Block> blocks_;
  std::optional<K> tie_guess_;  // set by sample_band when the band is too wide
  double sampled_zeros_ = 0;    // set by sample_band: the fraction of its keys that are 0

  int64_t gpos(const Block& b, int64_t i) const { return srcs_[b.src].pos0 + i; }

  std::vector<at::Tensor> finish_empty() const {
    return position_tensors(std::vector<int64_t>(srcs_.size(), 0));
  }

  std::vector<at::Tensor> finish_all() const {
    std::vector<int64_t> sizes;
    for (const Source& s : srcs_) sizes.push_back(s.n);
    std::vector<at::Tensor> outs = position_tensors(sizes);
    for (size_t i = 0; i < outs.size(); ++i) {
      int64_t* o = outs[i].data_ptr<int64_t>();
      parallel_for(0, srcs_[i].n, kBlock, [&](int64_t b, int64_t e) {
        for (int64_t j = b; j < e; ++j) o[j] = j;
      });
    }
    return outs;
  }

  // Small inputs: every key in a vector, the k-th by nth_element on the bare keys
  // (4 or 8 bytes each, not key-and-position pairs), then one ascending scan that
  // takes the keys above it and the first ties at it. Many small tensors (a model's
  // biases and norms) each take this path, so it is kept lean.
  std::vector<at::Tensor> run_serial() const {
    std::vector<K> keys(n_);
    for (const Source& s : srcs_)
      with_reader<K>(s, [&](auto rd) {
        for (int64_t i = 0; i < s.n; ++i) keys[s.pos0 + i] = rd(i);
      });
    // The k-th key: an 11-bit histogram of the top bits finds its bin, nth_element
    // then runs over that bin's keys alone (all of them only when every key shares
    // the bin).
    constexpr int kShift = int(sizeof(K) * 8) - kDigitBits;
    std::vector<int64_t> hist(size_t(1) << kDigitBits, 0);
    for (K key : keys) ++hist[size_t(key >> kShift)];
    int64_t bin = int64_t(hist.size()) - 1, above = 0;
    while (above + hist[size_t(bin)] < k_) above += hist[size_t(bin--)];
    std::vector<K> work;
    work.reserve(size_t(hist[size_t(bin)]));
    for (K key : keys)
      if (int64_t(key >> kShift) == bin) work.push_back(key);
    const int64_t rank = k_ - above - 1;  // 0-based rank from the top inside the bin
    std::nth_element(work.begin(), work.begin() + rank, work.end(), std::greater<K>());
    const K kth = work[size_t(rank)];
    int64_t ties = k_;  // ties at the k-th key still to take: k minus the keys above it
    for (K key : keys) ties -= key > kth;
    std::vector<int64_t> sizes(srcs_.size(), 0);
    int64_t left = ties;
    for (size_t i = 0; i < srcs_.size(); ++i)
      for (int64_t j = 0; j < srcs_[i].n; ++j) {
        const K key = keys[srcs_[i].pos0 + j];
        const bool take = key > kth || (key == kth && left > 0);
        left -= key == kth && left > 0;
        sizes[i] += take;
      }
    std::vector<at::Tensor> outs = position_tensors(sizes);
    left = ties;
    for (size_t i = 0; i < srcs_.size(); ++i) {
      int64_t* o = outs[i].data_ptr<int64_t>();
      for (int64_t j = 0; j < srcs_[i].n; ++j) {
        const K key = keys[srcs_[i].pos0 + j];
        if (key > kth || (key == kth && left > 0)) {
          left -= key == kth;
          *o++ = j;
        }
      }
    }
    return outs;
  }

  // The first position and the stride of sample_keys' sample of s keys.
  std::pair<int64_t, int64_t> sample_stride(int64_t s) const {
    uint64_t stride = std::max<uint64_t>(1, uint64_t(n_ / s));
    if (stride % 2 == 0) --stride;
    return {int64_t(fmix32(uint32_t(n_) ^ 0x9e3779b9u) % stride), int64_t(stride)};
  }

  // Keys of s elements at a constant odd stride from a hashed start. A constant
  // stride lets the hardware prefetcher run ahead of the reads: with a random
  // offset in each stride, every read waits on memory, and the sample costs several
  // full reads of the tensor. An odd stride walks through every column of a matrix
  // whose rows are a power of two (or any even) long. The reads are left to the
  // hardware's stride prefetcher: requests 64 keys ahead made them slower.
  std::vector<K> sample_keys(int64_t s) const {
    const auto [start, step] = sample_stride(s);
    // The first sample index whose position is at or past x.
    const auto first_at = [&](int64_t x) { return x <= start ? 0 : (x - start + step - 1) / step; };
    std::vector<K> keys(s);
    parallel_for(0, s, 4096, [&](int64_t b, int64_t e) {
      for (const Source& src : srcs_) {
        const int64_t first = std::max(b, first_at(src.pos0));
        const int64_t last = std::min(e, first_at(src.pos0 + src.n));
        if (first >= last) continue;
        with_reader<K>(src, [&](auto rd) {
          int64_t at = start + first * step - src.pos0;
          for (int64_t j = first; j < last; ++j, at += step) keys[j] = rd(at);
        });
      }
    });
    return keys;
  }

  // The positions of the answer from candidates (key, position in the concatenation,
  // ascending) that hold every key >= the k-th, at least k of them: the k-th of the
  // candidates is the k-th, and its ties are taken lowest positions first.
  void choose(const std::vector<K>& ckey, const std::vector<int64_t>& cpos,
              std::vector<int64_t>& chosen) const {
    TORCH_INTERNAL_ASSERT(int64_t(ckey.size()) >= k_, "incrkern.select: ", ckey.size(),
                          " candidates for k = ", k_);
    const K kth = kth_of_few(ckey, k_);
    int64_t greater = 0, equal = 0;
    for (K key : ckey) greater += key > kth, equal += key == kth;
    // The keys equal to the k-th are taken lowest positions first: those before `cut`.
    size_t cut = ckey.size();
    if (k_ - greater < equal) {
      int64_t ties = k_ - greater;
      for (cut = 0; ties > 0; ++cut) ties -= ckey[cut] == kth;
    }
    // Without a branch (a candidate is chosen about as often as not), and without a
    // count carried from one candidate to the next. | and &, not || and &&: gcc made
    // the short-circuit a branch, mispredicted on about every other candidate.
    if (chosen.size() < ckey.size()) chosen.resize(ckey.size());
    size_t c = 0;
    for (size_t j = 0; j < ckey.size(); ++j) {
      chosen[c] = cpos[j];
      c += size_t(ckey[j] > kth) | (size_t(ckey[j] == kth) & size_t(j < cut));
    }
    chosen.resize(c);
  }

  // The same as one position tensor per source.
  std::vector<at::Tensor> finish_candidates(const std::vector<K>& ckey,
                                            const std::vector<int64_t>& cpos) const {
    std::vector<int64_t> chosen;
    choose(ckey, cpos, chosen);
    std::vector<int64_t> sizes(srcs_.size(), 0);
    std::vector<int64_t> starts;
    for (const Source& src : srcs_) starts.push_back(src.pos0);
    for (int64_t q : chosen)
      ++sizes[std::upper_bound(starts.begin(), starts.end(), q) - starts.begin() - 1];
    std::vector<at::Tensor> outs = position_tensors(sizes);
    size_t j = 0;
    for (size_t i = 0; i < srcs_.size(); ++i) {
      int64_t* o = outs[i].data_ptr<int64_t>();
      for (int64_t c = 0; c < sizes[i]; ++c) o[c] = chosen[j++] - srcs_[i].pos0;
    }
    return outs;
  }

  // Fills gmax with the largest key of every kTile-element tile (the last may be
  // short) and returns a key at most one top-bits bin under T, the k-th largest of
  // them: still at most the k-th key, at the cost of the few more candidates of
  // that bin. Where k is at most an eighth of the tiles, the histogram counts the
  // maxima of four tiles at a time instead: the k-th of those is at most the k-th key
  // too (each is the largest of its own 64 keys), a few more tiles pass it, and the
  // counting, a chain of increments of a few hot bins, takes a quarter as long.
  K tile_max_floor(std::vector<K>& gmax) const {
    TopBitsHistogram<K> hist;
    const bool by_four = k_ * 8 <= int64_t(gmax.size());
    size_t gi = 0;
    for (const Source& src : srcs_)
      with_reader<K>(src, [&](auto rd) {
        int64_t i = 0;
        if constexpr (kScanReader<K, decltype(rd)>) {
          // In chunks of 4 KB, each counted while the next streams in.
          constexpr int64_t kChunkTiles = 64;
          const int64_t whole = src.n / kTile;
          for (int64_t g = 0; g < whole; g += kChunkTiles) {
            const int64_t m = std::min(kChunkTiles, whole - g);
            scan_tile_max<kSignedReader<decltype(rd)>>(rd.p + g * kTile, m, gmax.data() + gi);
            const K* q = gmax.data() + gi;
            if (by_four) {
              K fours[kChunkTiles / 4];
              int64_t j = 0;
              for (; j + 4 <= m; j += 4)
                fours[j / 4] = std::max(std::max(q[j], q[j + 1]), std::max(q[j + 2], q[j + 3]));
              hist.add_all(fours, j / 4);
              hist.add_all(q + j, m - j);
            } else {
              hist.add_all(q, m);
            }
            gi += size_t(m);
          }
          i = whole * kTile;
        }
        for (; i + kTile <= src.n; i += kTile) {
          K keys[kTile];
          tile_keys(rd, i, keys);
          K mx = keys[0];
          for (int j = 1; j < kTile; ++j) mx = keys[j] > mx ? keys[j] : mx;
          hist.add(mx);
          gmax[gi++] = mx;
        }
        if (i < src.n) {
          K mx = 0;
          for (; i < src.n; ++i) mx = std::max(mx, rd(i));
          hist.add(mx);
          gmax[gi++] = mx;
        }
      });
    return hist.locate(k_).first;
  }

  // Inputs that tile_max_fits (up to 2^20 elements, k at most half the number of
  // kTile-element tiles: density up to about 3%), exact and without a sample: one streaming read
  // takes the largest key of every tile; T, the k-th largest of those maxima, is
  // at most the k-th key (k tiles each hold a key >= T), so every key >= the k-th
  // lies in a tile whose maximum is >= T: about k tiles, read again from the cache
  // for their keys >= T (T is taken from a histogram counted during the read, up to
  // one bin low: a few more candidates). A model's many small tensors take this path; it reads each
  // once from memory and branches once per chosen tile, where a sampled threshold
  // read the tensor twice (the sample's reads each waiting on memory) and branched
  // on every tile holding a candidate of a looser bound.
  std::vector<at::Tensor> run_tile_max() const {
    TileMaxBuffers b;
    tile_max_candidates(b);
    return finish_candidates(b.ckey, b.cpos);
  }

 public:
  // run_tile_max's working vectors, kept by a caller that selects over many small
  // tensors in turn (a model's params, one thread each): a tensor of 10K elements
  // takes a few µs, and each allocation a noticeable part of it.
  struct TileMaxBuffers {
    std::vector<K> gmax, ckey;
    std::vector<int64_t> cpos, tiles, pos;
  };

  // The ascending positions of run_tile_max's answer over one source, into `chosen`,
  // with the caller's buffers and no tensor made.
  void tile_max_positions(TileMaxBuffers& b, std::vector<int64_t>& chosen) const {
    TORCH_INTERNAL_ASSERT(srcs_.size() == 1 && srcs_[0].pos0 == 0 &&
                          (tile_max_fits(n_, k_) || tile_max_fits_beside(n_, k_)));
    tile_max_candidates(b);
    choose(b.ckey, b.cpos, chosen);
  }

 private:
  // The candidates of run_tile_max: every key >= the tile-maxima floor, in the tiles
  // that reach it (ascending positions), completed by the lowest-positioned zeros.
  void tile_max_candidates(TileMaxBuffers& b) const {
    int64_t tiles = 0;
    for (const Source& src : srcs_) tiles += (src.n + kTile - 1) / kTile;
    std::vector<K>& gmax = b.gmax;
    gmax.resize(static_cast<size_t>(tiles));
    // A floor of 0 would let every tile in (0 is the least key): so it is with fewer
    // nonzero tiles than k, as in an embedding whose unused rows have no gradient.
    // The keys above 0 are listed instead, completed by the lowest-positioned zeros
    // when they are fewer than k.
    const K tile_floor = tile_max_floor(gmax);
    const K t = tile_floor == 0 ? K(1) : tile_floor;
    std::vector<K>& ckey = b.ckey;
    std::vector<int64_t>& cpos = b.cpos;
    ckey.clear(), cpos.clear();
    ckey.reserve(size_t(2 * k_ + kTile));
    cpos.reserve(ckey.capacity());
    size_t gi = 0;
    for (const Source& src : srcs_)
      with_reader<K>(src, [&](auto rd) {
        int64_t i = 0;
        if constexpr (kScanReader<K, decltype(rd)>) {
          // The vector scans: the chosen tiles listed, then their keys >= t, both by
          // compress stores. The buffers are grown, never cleared: every entry read
          // is written first.
          const int64_t whole = src.n / kTile;
          const auto tiles_room = size_t(whole + kStoreSlack);
          if (b.tiles.size() < tiles_room) b.tiles.resize(tiles_room);
          int64_t* chosen = b.tiles.data();
          const int64_t nchosen = scan_keys_at_least(gmax.data() + gi, whole, t, chosen);
          const size_t room = size_t(nchosen * kTile + kStoreSlack);
          if (b.pos.size() < room) b.pos.resize(room);
          int64_t* pos = b.pos.data();
          constexpr bool kSigned = kSignedReader<decltype(rd)>;
          const int64_t m = scan_tiles_at_least<kSigned>(rd.p, chosen, nchosen,
                                                         order_greater_than<kSigned>(t), pos);
          const size_t at = ckey.size();
          ckey.resize(at + size_t(m)), cpos.resize(at + size_t(m));
          for (int64_t j = 0; j < m; ++j)
            ckey[at + size_t(j)] = rd(pos[j]), cpos[at + size_t(j)] = src.pos0 + pos[j];
          gi += size_t(whole);
          i = whole * kTile;
        }
        for (; i < src.n; i += kTile, ++gi) {
          if (gmax[gi] < t) continue;
          const int64_t stop = std::min(src.n, i + kTile);
          for (int64_t e = i; e < stop; ++e) {
            const K key = rd(e);
            if (key >= t) ckey.push_back(key), cpos.push_back(src.pos0 + e);
          }
        }
      });
    if (tile_floor == 0 && int64_t(ckey.size()) < k_)
      add_lowest_zeros(ckey, cpos, k_ - int64_t(ckey.size()));
  }

  // Adds to candidates (ascending positions) the `need` lowest-positioned keys equal
  // to 0, keeping the positions ascending. There are at least that many: the caller
  // holds every key above 0 and fewer than k of them.
  void add_lowest_zeros(std::vector<K>& ckey, std::vector<int64_t>& cpos, int64_t need) const {
    std::vector<int64_t> zeros;
    zeros.reserve(size_t(need));
    for (const Source& src : srcs_)
      with_reader<K>(src, [&](auto rd) {
        for (int64_t i = 0; i < src.n && int64_t(zeros.size()) < need; ++i)
          if (rd(i) == 0) zeros.push_back(src.pos0 + i);
      });
    std::vector<K> keys(ckey.size() + zeros.size());
    std::vector<int64_t> pos(keys.size());
    size_t a = 0, b = 0;
    for (size_t j = 0; j < keys.size(); ++j) {
      const bool zero = b < zeros.size() && (a == cpos.size() || zeros[b] < cpos[a]);
      keys[j] = zero ? K(0) : ckey[a];
      pos[j] = zero ? zeros[b++] : cpos[a++];
    }
    ckey.swap(keys);
    cpos.swap(pos);
  }

  // Inputs of up to one block too dense for run_tile_max, k still small against n
  // (up to about 20%): a sample bounds the k-th key from below (L, four standard
  // deviations under it), one vectorised read keeps the (key, position) pairs with
  // key >= L, and the k-th key is found among them. nullopt when not sparse enough or
  // when the sample's bound missed (fewer than k keys >= L): run_serial or the band
  // then answers.
  std::optional<std::vector<at::Tensor>> run_filter() const {
    // Denser: not sparse enough to pay off.
    const auto band = filter_band(0.25);
    if (!band) return std::nullopt;
    const K lo = band->lo;
    const double kept = band->kept;
    // Candidates written through a cursor into arrays grown only when a tile
    // could overflow them (push_back per element is a call and a check each).
    std::vector<K> ckey(size_t(2 * kept * double(n_)) + kTile);
    std::vector<int64_t> cpos(ckey.size());  // position in the concatenation, ascending
    size_t nc = 0;
    auto room = [&] {
      if (nc + kTile > ckey.size()) ckey.resize(2 * ckey.size()), cpos.resize(ckey.size());
    };
    for (const Source& src : srcs_)
      with_reader<K>(src, [&](auto rd) {
        auto take = [&](int64_t i, K key) {
          room();
          ckey[nc] = key;
          cpos[nc++] = src.pos0 + i;
        };
        if (for_band(rd, int64_t(0), src.n, lo, std::numeric_limits<K>::max(), kept,
                     [&](const int64_t* pos, int64_t n) {
                       for (int64_t j = 0; j < n; ++j) take(pos[j], rd(pos[j]));
                     }, take))
          return;
        int64_t i = 0;
        for (; i + kTile <= src.n; i += kTile) {
          K tile[kTile];
          tile_keys(rd, i, tile);
#if defined(__SSE2__)
          if constexpr (sizeof(K) == 4) {
            uint32_t m = mask_greater(tile, lo - 1);
            if (!m) continue;
            room();
            for (; m; m &= m - 1) {
              const int j = __builtin_ctz(m);
              ckey[nc] = tile[j];
              cpos[nc++] = src.pos0 + i + j;
            }
            continue;
          }
#endif
          if (!any_at_least(tile, lo)) continue;
          room();
          for (int j = 0; j < kTile; ++j)
            if (tile[j] >= lo) ckey[nc] = tile[j], cpos[nc++] = src.pos0 + i + j;
        }
        for (; i < src.n; ++i) {
          const K key = rd(i);
          room();
          if (key >= lo) ckey[nc] = key, cpos[nc++] = src.pos0 + i;
        }
      });
    ckey.resize(nc);
    cpos.resize(nc);
    if (int64_t(ckey.size()) < k_) return std::nullopt;
    return finish_candidates(ckey, cpos);
  }

  // A lower bound L on the k-th key from a sample (filter_sample), four standard
  // deviations under it, and the fraction of the keys expected at or above L; nothing
  // when that fraction passes max_kept or L is 0 (every key would pass). run_filter
  // keeps every key >= L.
  struct FilterBand {
    K lo;
    double kept;
  };
  std::optional<FilterBand> filter_band(double max_kept) const {
    const int64_t s = filter_sample();
    const SampleRanks r = sample_ranks(s);
    if (r.lo >= int64_t(max_kept * double(s))) return std::nullopt;
    const K lo = sample_edges(sample_keys(s), -1, r.lo).first;
    if (lo == 0) return std::nullopt;
    return FilterBand{lo, double(r.lo + 1) / double(s)};
  }

  // Public for the fused select-and-update (fused/fused_cpu.cpp), which streams its
  // own band pass.
 public:
  // A band [L, H] on the k-th key for the threshold stream of a tensor of up to one
  // block, from the same sample, four standard deviations of margin either side; L is
  // 0 where the margin reaches the sample's smallest keys (densities near 1, or the
  // k-th among many zeros). The stream keeps the keys inside the band and finds the
  // k-th among them, so any band is correct; nothing when a band reaching 0 holds more
  // than kWideBand of the sample's keys at a density under kWideBandDensity: the
  // positions' update then costs less (docs/design.md, "The threshold stream").
  std::optional<std::pair<K, K>> stream_band() const {
    const int64_t s = filter_sample();
    const std::vector<K> keys = sample_keys(s);
    const auto [lo, hi] = band_edges(keys);
    if (lo == 0 && double(k_) < kWideBandDensity * double(n_)) {
      const auto in_band = std::count_if(keys.begin(), keys.end(), [&](K key) { return key <= hi; });
      if (double(in_band) > kWideBand * double(s)) return std::nullopt;
    }
    return std::make_pair(lo, hi);
  }

  // The same band, never refused: select_mask (select_cpu.cpp) counts the band's zero
  // keys instead of keeping them.
  std::pair<K, K> band() const { return band_edges(sample_keys(filter_sample())); }

  // The band [L, H] from a constant-stride sample (sample_keys), or nothing when the
  // sample predicts more candidates than the budget allows.
  std::optional<std::pair<K, K>> sample_band() {
    // A key of the sample costs about what a line of the pass's read does (each waits
    // on its own line), so the sample takes a key per 256 elements, one per 16 lines:
    // at one per 32, a 3M-element matrix's sample took about as long as its read. At
    // density 0.2% and under, one per 512: the band then holds few keys, and the wider
    // band of a smaller sample costs less than the reads it saves.
    const int64_t spacing = sparse_sample() ? 2 * kSampleSpacing : kSampleSpacing;
    const int64_t s = std::min({kSample, n_, std::max<int64_t>(kMinSample, n_ / spacing)});
    const std::vector<K> keys = sample_keys(s);
    const SampleRanks r = sample_ranks(s);
    const auto [lo, hi] = sample_edges(keys, r.hi, r.lo);
    int64_t in_band = 0, zeros = 0;
    for (K key : keys) in_band += key >= lo && key <= hi, zeros += key == 0;
    sampled_zeros_ = double(zeros) / double(s);
    const double predicted = double(in_band) * double(n_) / double(s);
    if (predicted > double(budget_) / 2) {
      // Too wide, usually because many keys tie inside the band: the sample's
      // k-th key is then a good guess of the true one.
      const int64_t rank = std::clamp<int64_t>(int64_t(r.mean), 0, std::min(r.lo, s - 1));
      tie_guess_ = kth_of_few(keys, rank + 1);
      return std::nullopt;
    }
    return std::make_pair(lo, hi);
  }

 private:

  // The size of filter_band's and stream_band's sample: about n/64 keys, 256 to 4096.
  int64_t filter_sample() const { return std::min(n_, std::clamp<int64_t>(n_ / 64, 256, 4096)); }

  // The band of stream_band and band from their sample's keys.
  std::pair<K, K> band_edges(const std::vector<K>& keys) const {
    const SampleRanks r = sample_ranks(int64_t(keys.size()));
    return sample_edges(keys, r.hi, r.lo);
  }

  static constexpr double kWideBand = 0.25, kWideBandDensity = 0.15;

  // The sample's ranks from the top (0-based) of the k-th key's expected place
  // (mean) and of the band's edges, four standard deviations (and 4) either side.
  struct SampleRanks {
    double mean;
    int64_t hi, lo;
  };
  SampleRanks sample_ranks(int64_t s) const {
    const double p = double(k_) / double(n_);
    const double mean = p * double(s), margin = 4 * std::sqrt(double(s) * p * (1 - p)) + 4;
    return {mean, int64_t(std::floor(mean - margin)), int64_t(std::ceil(mean + margin))};
  }

  // The keys of ranks rank_lo and rank_hi among a sample's (0-based, from the top) as
  // the band's edges [L, H]: 0 for a rank_lo past the sample, the largest key for a
  // rank_hi under 0. A histogram of the keys' top bits, then nth_element inside the
  // bins that hold them (nth_element over the whole sample mispredicts a branch per
  // key per round).
  static std::pair<K, K> sample_edges(const std::vector<K>& keys, int64_t rank_hi,
                                      int64_t rank_lo) {
    const int64_t s = int64_t(keys.size());
    K lo = 0, hi = std::numeric_limits<K>::max();
    if (rank_lo < s && rank_hi >= 0) std::tie(hi, lo) = kths_of_few(keys, rank_hi + 1, rank_lo + 1);
    else if (rank_lo < s) lo = kth_of_few(keys, rank_lo + 1);
    else if (rank_hi >= 0) hi = kth_of_few(keys, rank_hi + 1);
    return {lo, hi};
  }

  // One read: per block, positions with key > hi and candidates lo <= key <= hi.
  // Returns false when the candidates overflow `cap` (the pass then stops early).
  bool band_pass(K lo, K hi, int64_t cap, std::vector<BandOut<K>>& out) const {
    out.assign(blocks_.size(), BandOut<K>{});
    std::atomic<int64_t> total{0};
    std::atomic<bool> overflow{false};
    const double expect_w = double(k_) / double(n_);
    parallel_for_claimed(0, int64_t(blocks_.size()), 1, [&](int64_t b0, int64_t b1) {
      for (int64_t bi = b0; bi < b1; ++bi) {
        if (overflow.load(std::memory_order_relaxed)) return;
        const Block& blk = blocks_[bi];
        BandOut<K>& o = out[bi];
        // Sized once to the expected count; wn counts the winners written.
        o.win.resize(size_t(double(blk.end - blk.begin) * expect_w * 1.1) + 64);
        size_t wn = 0;
        with_reader<K>(srcs_[blk.src], [&](auto rd) {
          auto one = [&](int64_t i, K key) {
            if (key >= lo) {
              if (key > hi) {
                o.win.push_back(i);
              } else {
                o.ckey.push_back(key);
                o.cidx.push_back(i);
              }
            }
          };
          // Winners written through a cursor into o.win, sized above for the
          // expected count and grown when full. About k/n of the keys are winners,
          // and a third as many candidates.
          const bool fast = for_band(rd, blk.begin, blk.end, lo, hi, 1.4 * expect_w,
                                     [&](const int64_t* pos, int64_t n) {
            if (wn + size_t(n) > o.win.size()) o.win.resize(2 * (wn + size_t(n)));
            std::copy(pos, pos + n, o.win.data() + wn);
            wn += size_t(n);
          }, [&](int64_t i, K key) {
            o.ckey.push_back(key);
            o.cidx.push_back(i);
          });
          if (fast) {
            o.win.resize(wn);
            return;
          }
          int64_t i = blk.begin;
          for (; i + kTile <= blk.end; i += kTile) {
            K keys[kTile];
            tile_keys(rd, i, keys);
            if (wn + kTile > o.win.size()) o.win.resize(2 * o.win.size() + kTile);
            int64_t* wp = o.win.data() + wn;
#if defined(__SSE2__)
            if constexpr (sizeof(K) == 4) {
              // Bit masks of the tile's winners and candidates; only set bits are
              // visited (about one per tile at k = 1%).
              const uint32_t ge_lo = lo == 0 ? 0xffffu : mask_greater(keys, lo - 1);
              if (!ge_lo) continue;
              const uint32_t gt_hi = hi == std::numeric_limits<K>::max() ? 0u : mask_greater(keys, hi);
              for (uint32_t m = gt_hi; m; m &= m - 1) *wp++ = i + __builtin_ctz(m);
              for (uint32_t m = ge_lo & ~gt_hi; m; m &= m - 1) {
                const int j = __builtin_ctz(m);
                o.ckey.push_back(keys[j]);
                o.cidx.push_back(i + j);
              }
              wn = size_t(wp - o.win.data());
              continue;
            }
#endif
            if (!any_at_least(keys, lo)) continue;
            // Winners written without a branch (k may be half the input).
            for (int j = 0; j < kTile; ++j) {
              *wp = i + j;
              wp += keys[j] > hi;
              if (keys[j] >= lo && keys[j] <= hi) {
                o.ckey.push_back(keys[j]);
                o.cidx.push_back(i + j);
              }
            }
            wn = size_t(wp - o.win.data());
          }
          o.win.resize(wn);
          for (; i < blk.end; ++i) one(i, rd(i));
        });
        if (total.fetch_add(int64_t(o.cidx.size())) + int64_t(o.cidx.size()) > cap) {
          overflow.store(true);
          return;
        }
      }
    });
    return !overflow.load();
  }

  // e* is the r-th candidate under (key desc, position asc); each block then merges
  // its winners with its chosen candidates.
  std::vector<at::Tensor> resolve_and_merge(const std::vector<BandOut<K>>& out, int64_t r) const {
    std::vector<K> keys;
    for (const BandOut<K>& o : out) keys.insert(keys.end(), o.ckey.begin(), o.ckey.end());
    const K kth = kth_largest(keys, r);
    // The candidates keyed kth are taken lowest positions first: e* is the
    // (r - #greater)-th of them in position order (blocks are in position order).
    int64_t ties = r;
    for (const BandOut<K>& o : out)
      for (K key : o.ckey) ties -= key > kth;
    Cand<K> last{kth, -1};
    for (size_t bi = 0; bi < out.size() && last.pos < 0; ++bi)
      for (size_t j = 0; j < out[bi].cidx.size(); ++j)
        if (out[bi].ckey[j] == kth && --ties == 0) {
          last.pos = gpos(blocks_[bi], out[bi].cidx[j]);
          break;
        }
    return merge(out, [&](const Block& b, K key, int64_t i) {
      return !before(last, Cand<K>{key, gpos(b, i)});
    });
  }

  // Winners plus all candidates (take_cands) or the winners alone.
  std::vector<at::Tensor> merge_all(const std::vector<BandOut<K>>& out, bool take_cands) const {
    return merge(out, [&](const Block&, K, int64_t) { return take_cands; });
  }

  template <typename Chosen>
  std::vector<at::Tensor> merge(const std::vector<BandOut<K>>& out, Chosen&& chosen) const {
    const int64_t nb = int64_t(blocks_.size());
    std::vector<int64_t> count(nb), offset(nb);
    parallel_for_claimed(0, nb, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t bi = b0; bi < b1; ++bi) {
        int64_t c = int64_t(out[bi].win.size());
        for (size_t j = 0; j < out[bi].cidx.size(); ++j)
          c += chosen(blocks_[bi], out[bi].ckey[j], out[bi].cidx[j]);
        count[bi] = c;
      }
    });
    std::vector<at::Tensor> outs = block_outputs(srcs_, blocks_, count, offset);
    parallel_for_claimed(0, nb, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t bi = b0; bi < b1; ++bi) {
        const BandOut<K>& o = out[bi];
        int64_t* dst = outs[blocks_[bi].src].data_ptr<int64_t>() + offset[bi];
        size_t w = 0;
        for (size_t j = 0; j < o.cidx.size(); ++j) {
          if (!chosen(blocks_[bi], o.ckey[j], o.cidx[j])) continue;
          while (w < o.win.size() && o.win[w] < o.cidx[j]) *dst++ = o.win[w++];
          *dst++ = o.cidx[j];
        }
        while (w < o.win.size()) *dst++ = o.win[w++];
      }
    });
    return outs;
  }

  // The exact path: radix select over the digits, then a band pass over the
  // bucket of the k-th, or a count and a write pass once its key is known.
  std::vector<at::Tensor> run_radix() const {
    constexpr int kBits = int(sizeof(K) * 8);
    K prefix = 0;
    int shift = kBits;
    int64_t r = k_;  // rank of e* among the keys that share the prefix
    while (true) {
      const int bits = std::min(kDigitBits, shift);
      const int low = shift - bits;
      const DigitHistogram<K> hist =
          digit_histogram(srcs_, blocks_, prefix, low, bits, shift == kBits);
      int b = (1 << bits) - 1;
      int64_t above = 0;
      for (; b > 0; --b) {
        if (above + hist.count[b] >= r) break;
        above += hist.count[b];
      }
      r -= above;
      const int64_t count = hist.count[b];
      prefix |= K(b) << low;
      shift = low;
      const K lo = prefix;
      const K hi = prefix | (shift == 0 ? K(0) : (K(~K(0)) >> (kBits - shift)));
      if (count == r) return final_pass(srcs_, blocks_, lo, -1);  // the whole bucket is chosen
      // One key fills the bucket (ties, all-equal inputs): the k-th key is known.
      if (hist.min[b] == hist.max[b]) return final_pass(srcs_, blocks_, hist.min[b], r);
      if (count <= budget_) {
        std::vector<BandOut<K>> out;
        band_pass(lo, hi, std::numeric_limits<int64_t>::max(), out);
        int64_t w = 0;
        for (const auto& o : out) w += int64_t(o.win.size());
        TORCH_CHECK(w + r == k_, "incrkern.select: internal error in the radix select");
        return resolve_and_merge(out, r);
      }
      TORCH_CHECK(shift > 0, "incrkern.select: internal error in the radix select");
    }
  }
};

}  // namespace incrkern::select
