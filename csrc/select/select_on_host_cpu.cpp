// incrkern._C.cuda_select_on_host: the CUDA select's launch sequence
// (select/select_cuda.cu) run on the host over float32 tensors (and residuals, for
// error feedback's keys), so that the CPU tests hold what the GPU runs to the
// reference. The same host code groups the
// call and builds its tables (select/select_tables.h); every pass then runs its
// chunks in turn with the kernels' digit logic (select/radix_digits.h): the three
// histograms, the level-1 candidate buffer and the level-2 histogram over it, the
// per-chunk tie counts and the search for the last tie taken, the per-chunk output
// counts, their scan and the compaction. What the kernels take on trust is checked
// here: every walk ends in a bin that holds the rank it seeks, the candidates fit
// their group's slots, a located tie exists, and an exact group chooses k (per
// tensor, the size the host gives the output without reading the counts).
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "select/radix_digits.h"
#include "select/select_keys.h"
#include "select/select_on_host.h"
#include "select/select_tables.h"

namespace incrkern::host_run {

using cuda::SelChunk;
using cuda::SelSeg;
using cuda::SelState;

namespace {

// hist_input_kernel and, at level 2, hist_cands_kernel.
void histograms(HostLaunch& L, int level) {
  const int low = cuda::level_low(level);
  const uint32_t mask = (1u << cuda::level_bits(level)) - 1u;
  for (const SelChunk& c : L.t.chunks) {
    SelState& st = L.state(c);
    if (st.done || (level == 2 && st.use_cands)) continue;
    const bool buffer = level == 1 && st.use_cands;
    unsigned long long* hist = L.group_hist(size_t(L.seg(c).group));
    for (int64_t i = c.begin; i < c.end; ++i) {
      const uint32_t key = L.key(c, i);
      if (!cuda::in_level(key, st.prefix, level)) continue;
      ++hist[(key >> low) & mask];
      if (buffer) {
        TORCH_CHECK(st.cand_count < st.cap, "candidates overflow their group's ", st.cap,
                    " slots");
        L.cand_key[size_t(st.cand_base + st.cand_count++)] = key;
      }
    }
  }
  if (level != 2) return;
  for (size_t g = 0; g < L.t.states.size(); ++g) {
    const SelState& st = L.t.states[g];
    if (st.done || !st.use_cands) continue;
    for (int64_t j = 0; j < st.cand_count; ++j) {
      const uint32_t key = L.cand_key[size_t(st.cand_base + j)];
      if (cuda::in_level(key, st.prefix, 2)) ++L.group_hist(g)[key & 1023u];
    }
  }
}

// find_kernel: each unsettled group's digit, its histogram cleared after.
void find_digits(HostLaunch& L, int level, std::vector<int>& levels) {
  const int nbins = 1 << cuda::level_bits(level);
  for (size_t g = 0; g < L.t.states.size(); ++g) {
    SelState& st = L.t.states[g];
    unsigned long long* hist = L.group_hist(g);
    if (!st.done) {
      unsigned long long above = 0;
      const auto r = static_cast<unsigned long long>(st.r);
      const int bin = cuda::walk_bins(hist, nbins - 1, nbins, r, above);
      TORCH_CHECK(above < r && r <= above + hist[bin], "level ", level, " of group ", g,
                  " holds no key of rank ", st.r);
      cuda::settle_digit(st, uint32_t(bin), int64_t(above), int64_t(hist[bin]), level);
      ++levels[g];
    }
    std::fill(hist, hist + cuda::kSelectBins, 0ull);
  }
}

// tie_count_kernel, then tie_find_kernel: the chunk holding the r-th tie of each
// unsettled group, by its chunks' counts, then the tie within that chunk.
void locate_ties(HostLaunch& L, std::vector<bool>& ties) {
  const std::vector<SelChunk>& chunks = L.t.chunks;
  for (size_t ci = 0; ci < chunks.size(); ++ci) {
    const SelChunk& c = chunks[ci];
    const SelState& st = L.state(c);
    int64_t count = 0;
    if (!st.done)
      for (int64_t i = c.begin; i < c.end; ++i) count += L.key(c, i) == st.threshold;
    L.chunk_ties[ci] = count;
  }
  for (size_t g = 0; g < L.t.states.size(); ++g) {
    SelState& st = L.t.states[g];
    if (st.done) continue;
    ties[g] = true;
    int64_t before = 0, chunk = 0;
    for (; chunk < st.nchunks; ++chunk) {
      const int64_t v = L.chunk_ties[size_t(st.first_chunk + chunk)];
      if (before < st.r && st.r <= before + v) break;
      before += v;
    }
    TORCH_CHECK(chunk < st.nchunks, "group ", g, " has no tie of rank ", st.r);
    const SelChunk& c = chunks[size_t(st.first_chunk + chunk)];
    const int64_t pos0 = L.seg(c).pos0;
    int64_t want = st.r - before;
    for (int64_t i = c.begin; i < c.end; ++i)
      if (L.key(c, i) == st.threshold && --want == 0) {
        st.last_pos = pos0 + i;
        break;
      }
    st.done = 1;
  }
}

}  // namespace

// count_kernel, the exclusive scan, write_kernel: every segment's chosen positions,
// relative to its own element 0, at its chunks' offsets in one flat output.
std::vector<int64_t> write_chosen(HostLaunch& L) {
  const std::vector<SelChunk>& chunks = L.t.chunks;
  for (size_t ci = 0; ci < chunks.size(); ++ci) {
    const SelChunk& c = chunks[ci];
    const SelState& st = L.state(c);
    const int64_t pos0 = L.seg(c).pos0;
    int64_t count = 0;
    for (int64_t i = c.begin; i < c.end; ++i) count += cuda::chosen(st, L.key(c, i), pos0 + i);
    L.chunk_count[ci] = count;
  }
  L.chunk_count[chunks.size()] = 0;
  for (size_t ci = 0, sum = 0; ci <= chunks.size(); ++ci)
    L.chunk_off[ci] = int64_t(sum), sum += size_t(L.chunk_count[ci]);
  std::vector<int64_t> flat(size_t(L.chunk_off[chunks.size()]));
  for (size_t ci = 0; ci < chunks.size(); ++ci) {
    const SelChunk& c = chunks[ci];
    const SelState& st = L.state(c);
    const int64_t pos0 = L.seg(c).pos0;
    int64_t* dst = flat.data() + L.chunk_off[ci];
    for (int64_t i = c.begin; i < c.end; ++i)
      if (cuda::chosen(st, L.key(c, i), pos0 + i)) *dst++ = i;
  }
  return flat;
}

namespace {

void allocate(HostLaunch& L) {
  const size_t nchunks = L.t.chunks.size();
  L.hist.assign(L.t.states.size() * cuda::kSelectBins, 0ull);
  L.cand_key.assign(size_t(L.t.cand_total), 0u);
  L.chunk_ties.assign(nchunks, 0);
  L.chunk_count.assign(nchunks + 1, 0);
  L.chunk_off.assign(nchunks + 1, 0);
}

}  // namespace

std::vector<uint32_t> keys_of(ScoreKind kind, const float* g, const float* r, float alpha,
                              size_t n) {
  std::vector<uint32_t> keys(n);
  for (size_t i = 0; i < n; ++i)
    keys[i] = select::score_key32(kind, g[i], r ? r[i] : 0.f, alpha);
  return keys;
}

void settle(HostLaunch& L, std::vector<int>& levels, std::vector<bool>& ties) {
  allocate(L);
  levels.assign(L.t.states.size(), 0);
  ties.assign(L.t.states.size(), false);
  for (int level = 0; level < 3; ++level) {
    histograms(L, level);
    find_digits(L, level, levels);
  }
  locate_ties(L, ties);
}

std::vector<int64_t> int_list_arg(PyObject* list, const char* op, const char* name) {
  TORCH_CHECK(PyList_Check(list), op, ": ", name, " must be a list");
  std::vector<int64_t> out;
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(list); ++i) {
    const long long v = PyLong_AsLongLong(PyList_GET_ITEM(list, i));
    if (v == -1 && PyErr_Occurred()) throw python_error();
    out.push_back(v);
  }
  return out;
}

}  // namespace incrkern::host_run

namespace incrkern {
namespace {

using cuda::SelSeg;
using host_run::HostLaunch;

at::Tensor long_tensor(const int64_t* data, int64_t n) {
  at::Tensor out = at::empty({n}, at::TensorOptions().dtype(at::kLong));
  if (n > 0) std::memcpy(out.data_ptr<int64_t>(), data, size_t(n) * sizeof(int64_t));
  return out;
}

PyObject* int_list(const std::vector<int64_t>& v) {
  PyObject* list = PyList_New(Py_ssize_t(v.size()));
  for (size_t i = 0; i < v.size(); ++i) PyList_SET_ITEM(list, Py_ssize_t(i), PyLong_FromLongLong(v[i]));
  return list;
}

PyObject* cuda_select_on_host(PyObject* /*module*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject* seq = nullptr;
  PyObject* ks_seq = nullptr;
  PyObject* res_seq = Py_None;
  int global_scope = 0, approx = 0, signed_keys = 0;
  double alpha = 1.0;
  if (!PyArg_ParseTuple(args, "OOppp|Od", &seq, &ks_seq, &global_scope, &approx, &signed_keys,
                        &res_seq, &alpha))
    return nullptr;
  const char* op = "incrkern._C.cuda_select_on_host";
  TORCH_CHECK(PyList_Check(seq), op, ": tensors must be a list");
  const std::vector<int64_t> ks = host_run::int_list_arg(ks_seq, op, "ks");
  const bool accumulated = res_seq != Py_None;
  TORCH_CHECK(!accumulated || (PyList_Check(res_seq) &&
                               PyList_GET_SIZE(res_seq) == PyList_GET_SIZE(seq)),
              op, ": residuals must be None or a list as long as tensors");
  TORCH_CHECK(!(accumulated && signed_keys), op, ": residuals take |r + alpha * g| keys");
  const auto count = size_t(PyList_GET_SIZE(seq));
  std::vector<at::Tensor> tensors, residuals;
  std::vector<int64_t> numels;
  const auto flat_float = [&](PyObject* item, const char* name, size_t i) {
    TORCH_CHECK(THPVariable_Check(item), op, ": ", name, "[", i, "] must be a tensor");
    const at::Tensor x = THPVariable_Unpack(item);
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 1 &&
                    x.is_contiguous(),
                op, ": ", name, "[", i, "] must be a contiguous 1-D float32 CPU tensor");
    return x;
  };
  for (size_t i = 0; i < count; ++i) {
    tensors.push_back(flat_float(PyList_GET_ITEM(seq, Py_ssize_t(i)), "tensors", i));
    numels.push_back(tensors.back().numel());
    if (!accumulated) continue;
    residuals.push_back(flat_float(PyList_GET_ITEM(res_seq, Py_ssize_t(i)), "residuals", i));
    TORCH_CHECK(residuals.back().numel() == numels.back(), op, ": residuals[", i,
                "] must have tensors[", i, "]'s size");
  }
  int64_t total = 0;
  for (int64_t n : numels) total += n;
  TORCH_CHECK(ks.size() == (global_scope ? size_t(1) : count), op, ": ks must hold ",
              global_scope ? size_t(1) : count, " values, got ", ks.size());
  for (size_t i = 0; i < ks.size(); ++i) {
    const int64_t most = global_scope ? total : numels[i];
    TORCH_CHECK(ks[i] >= 0 && ks[i] <= most, op, ": ks[", i, "] must lie in [0, ", most,
                "], got ", ks[i]);
  }

  const cuda::SelectGroups groups = cuda::select_groups(numels, ks, global_scope != 0);
  HostLaunch L;
  L.t = cuda::select_tables(numels, groups.groups, groups.ks, approx != 0,
                            [](SelSeg&, size_t) {});
  const ScoreKind kind = accumulated ? ScoreKind::Accumulated
                        : signed_keys ? ScoreKind::Signed
                                      : ScoreKind::Abs;
  for (size_t t = 0; t < count; ++t)
    L.keys.push_back(host_run::keys_of(
        kind, tensors[t].const_data_ptr<float>(),
        accumulated ? residuals[t].const_data_ptr<float>() : nullptr, float(alpha),
        size_t(numels[t])));
  const size_t ngroups = L.t.states.size();
  std::vector<int> levels;
  std::vector<bool> ties;
  host_run::settle(L, levels, ties);
  const std::vector<int64_t> flat = host_run::write_chosen(L);

  // The outputs as select_cuda_ops.cpp's run() cuts them: in table order, each
  // segment's size k where the call is exact and per tensor, else read from the
  // offsets (here both, and they must agree). An exact group chooses k in all.
  std::vector<at::Tensor> outs(count);
  std::vector<int64_t> group_chosen(ngroups, 0);
  int64_t offset = 0;
  for (size_t s = 0; s < L.t.segs.size(); ++s) {
    const SelSeg& seg = L.t.segs[s];
    const int64_t size = L.chunk_off[size_t(seg.first_chunk + seg.nchunks)] -
                         L.chunk_off[size_t(seg.first_chunk)];
    group_chosen[size_t(seg.group)] += size;
    outs[L.t.seg_input[s]] = long_tensor(flat.data() + offset, size);
    offset += size;
  }
  for (size_t g = 0; g < ngroups && !approx; ++g)
    TORCH_CHECK(group_chosen[g] == groups.ks[g], "group ", g, ": ", group_chosen[g],
                " chosen where k = ", groups.ks[g]);
  for (size_t i = 0; i < count; ++i) {
    if (groups.settled[i] == cuda::Settled::Nothing) outs[i] = long_tensor(nullptr, 0);
    if (groups.settled[i] == cuda::Settled::All)
      outs[i] = at::arange(numels[i], at::TensorOptions().dtype(at::kLong));
  }

  PyObject* out_list = PyList_New(Py_ssize_t(count));
  for (size_t i = 0; i < count; ++i)
    PyList_SET_ITEM(out_list, Py_ssize_t(i), THPVariable_Wrap(std::move(outs[i])));
  std::vector<int64_t> level_list(levels.begin(), levels.end()), tie_list, cand_list;
  for (size_t g = 0; g < ngroups; ++g) {
    tie_list.push_back(ties[g]);
    cand_list.push_back(L.t.states[g].use_cands);
  }
  return Py_BuildValue("(NNNN)", out_list, int_list(level_list), int_list(tie_list),
                       int_list(cand_list));
  END_HANDLE_TH_ERRORS
}

}  // namespace

PyMethodDef kSelectOnHostMethods[] = {
    {"cuda_select_on_host", cuda_select_on_host, METH_VARARGS,
     "(tensors, ks, global_scope, approx, signed_keys, residuals=None, alpha=1.0) -> "
     "(positions, levels, ties, use_cands): the CUDA select's passes run on the host over "
     "1-D float32 CPU tensors (keys of |x|, of x with signed_keys, or of |r + alpha * x| "
     "with residuals), for the tests; the last three are per group."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace incrkern
