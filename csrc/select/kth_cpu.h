// CPU selection, part 2: the k-th largest of a list of keys held in memory.
//
//  - kth_largest: radix rounds over the keys' own range, then nth_element on the
//    few left; for the tens of thousands of candidates of a band.
//  - TopBitsHistogram: counts keys by their top 13 bits while a scan waits on
//    memory; locate() gives a lower bound at most one bin under the r-th largest.
//  - kths_of_few, kth_of_few: the r-th largest of a few hundred keys, or two ranks
//    of a sample (a TopBitsHistogram bin, then nth_element inside it).
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

namespace incrkern::select {

// The r-th largest (1-based) of keys, which it reorders. Radix rounds of up to 11
// bits over the keys' own range, each keeping only the bin of the r-th, then
// nth_element on the few left: on the tens of thousands of candidates of a band
// this is a few linear passes, where nth_element alone mispredicts a branch per
// key per partition round. Every key lies in [mn, mx]: a band's edges bound its keys
// and save a minmax pass, which costs as much as the rounds on a small tensor's few
// thousand band keys.
template <typename K>
K kth_largest(std::vector<K>& keys, int64_t r, K mn, K mx) {
  // Bins: about half as many as keys, at most 2^11. Four interleaved copies, so that
  // keys falling in one bin do not each wait on the previous increment of it.
  const int bits = std::clamp(int(std::bit_width(keys.size())) - 1, 4, 11);
  const size_t nbins = size_t(1) << bits;
  std::vector<uint32_t> hist(4 * nbins);
  while (int64_t(keys.size()) > 64 && mn != mx) {
    const int shift = std::max(0, int(std::bit_width(K(mx - mn))) - bits);
    std::fill(hist.begin(), hist.end(), 0u);
    size_t j = 0;
    for (; j + 4 <= keys.size(); j += 4)
      for (size_t c = 0; c < 4; ++c) ++hist[c * nbins + size_t((keys[j + c] - mn) >> shift)];
    for (; j < keys.size(); ++j) ++hist[size_t((keys[j] - mn) >> shift)];
    for (size_t b = 0; b < nbins; ++b)
      hist[b] += hist[nbins + b] + hist[2 * nbins + b] + hist[3 * nbins + b];
    size_t b = size_t((mx - mn) >> shift);
    for (; r > int64_t(hist[b]); --b) r -= hist[b];
    size_t w = 0;
    for (K key : keys)
      if (size_t((key - mn) >> shift) == b) keys[w++] = key;
    keys.resize(w);
    // The kept bin is [base, base + width], cut at mx: computed as a difference, since
    // base + width can pass the largest key (the top bin of keys near 2^32, +inf and
    // NaN as signed keys), where the sum wrapped and the loop never ended.
    const K base = K(mn + (K(b) << shift)), width = K((K(1) << shift) - 1);
    if (K(mx - base) > width) mx = K(base + width);
    mn = base;
  }
  if (mn == mx) return mn;
  std::nth_element(keys.begin(), keys.begin() + (r - 1), keys.end(), std::greater<K>());
  return keys[size_t(r - 1)];
}

// The same over the keys' own range.
template <typename K>
K kth_largest(std::vector<K>& keys, int64_t r) {
  const auto [lo_it, hi_it] = std::minmax_element(keys.begin(), keys.end());
  return kth_largest(keys, r, *lo_it, *hi_it);
}

// Counts of keys by their top 13 bits (1/32 of an octave for |float| keys), for a
// lower bound on the r-th largest key at most one bin under it. Keys are added while
// a scan waits on memory, where a count costs nothing; kth_largest's rounds over a
// small tensor's few hundred tile maxima afterwards would cost as much as reading
// the tensor. One table per thread, left zeroed for the next use.
template <typename K>
class TopBitsHistogram {
 public:
  static constexpr int kShift = int(8 * sizeof(K)) - 13;
  TopBitsHistogram() : hist_(table()) {
    TORCH_INTERNAL_ASSERT(!in_use(), "incrkern: one TopBitsHistogram per thread at a time");
    in_use() = true;
  }
  TopBitsHistogram(const TopBitsHistogram&) = delete;
  ~TopBitsHistogram() {
    if (lo_ <= hi_) std::fill(hist_.begin() + bin(lo_), hist_.begin() + bin(hi_) + 1, 0u);
    in_use() = false;
  }
  void add(K key) { add_all(&key, 1); }
  // The keys keys[0..n) counted. The least and largest key stay in registers: kept in
  // this object, each count's store (a uint32_t, as they may be) makes the compiler
  // store and reload both, one chain through memory from key to key.
  void add_all(const K* keys, int64_t n) {
    uint32_t* h = hist_.data();
    K lo = lo_, hi = hi_;
    for (int64_t j = 0; j < n; ++j) {
      ++h[bin(keys[j])];
      lo = std::min(lo, keys[j]);
      hi = std::max(hi, keys[j]);
    }
    lo_ = lo, hi_ = hi;
  }
  // The bin holding the r-th largest key added (1 <= r <= count): its least key, and
  // the rank of that key among the bin's keys.
  std::pair<K, int64_t> locate(int64_t r) const {
    size_t b = bin(hi_);
    for (; r > int64_t(hist_[b]); --b) r -= hist_[b];
    return {K(K(b) << kShift), r};
  }
  static size_t bin(K key) { return size_t(key >> kShift); }

 private:
  static std::vector<uint32_t>& table() {
    thread_local std::vector<uint32_t> t(size_t(1) << 13);
    return t;
  }
  static bool& in_use() {
    thread_local bool used = false;
    return used;
  }
  std::vector<uint32_t>& hist_;
  K lo_ = std::numeric_limits<K>::max(), hi_ = 0;
};

// The r1-th and r2-th largest of keys (1-based): the top-bits bins that hold them,
// then nth_element over those bins' keys only. For the few hundred candidates of a
// small tensor, where kth_largest's minmax and counting rounds cost more than this,
// and for the band edges of a sample, two ranks from one histogram.
template <typename K>
std::pair<K, K> kths_of_few(const std::vector<K>& keys, int64_t r1, int64_t r2) {
  std::pair<K, int64_t> at1, at2;
  {
    TopBitsHistogram<K> hist;
    hist.add_all(keys.data(), int64_t(keys.size()));
    at1 = hist.locate(r1);
    at2 = hist.locate(r2);
  }
  const size_t b1 = TopBitsHistogram<K>::bin(at1.first), b2 = TopBitsHistogram<K>::bin(at2.first);
  const bool one_bin = b1 == b2;
  std::vector<K> in1(keys.size()), in2(one_bin ? 0 : keys.size());
  size_t w1 = 0, w2 = 0;
  // Without a branch: whether a key is in a bin is as good as random.
  if (one_bin) {
    for (K key : keys) {
      in1[w1] = key;
      w1 += TopBitsHistogram<K>::bin(key) == b1;
    }
  } else {
    for (K key : keys) {
      const size_t b = TopBitsHistogram<K>::bin(key);
      in1[w1] = key;
      w1 += b == b1;
      in2[w2] = key;
      w2 += b == b2;
    }
  }
  auto nth = [](std::vector<K>& in, size_t w, int64_t r) {
    std::nth_element(in.begin(), in.begin() + (r - 1), in.begin() + w, std::greater<K>());
    return in[size_t(r - 1)];
  };
  const K k1 = nth(in1, w1, at1.second);
  if (r1 == r2) return {k1, k1};
  return {k1, one_bin ? nth(in1, w1, at2.second) : nth(in2, w2, at2.second)};
}

// The r-th largest of keys (1-based), as kths_of_few.
template <typename K>
K kth_of_few(const std::vector<K>& keys, int64_t r) {
  return kths_of_few(keys, r, r).first;
}

}  // namespace incrkern::select
