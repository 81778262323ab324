// incrkern._C.cuda_radix_on_host: the CUDA radix select's digit logic
// (select/radix_digits.h) run on the host over the |x| keys of one float32 tensor,
// one histogram per level as the kernels build them, so that the CPU tests hold the
// logic the GPU runs to the reference. Returns the positions the CUDA select
// chooses (ascending), the histogram levels it ran and whether it located a tie.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "select/radix_digits.h"
#include "select/select_keys.h"

namespace incrkern {
namespace {

PyObject* cuda_radix_on_host(PyObject* /*module*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject* scores = nullptr;
  long long k = 0;
  int approx = 0;
  if (!PyArg_ParseTuple(args, "OLp", &scores, &k, &approx)) return nullptr;
  const char* op = "incrkern._C.cuda_radix_on_host";
  TORCH_CHECK(THPVariable_Check(scores), op, ": scores must be a tensor");
  const at::Tensor x = THPVariable_Unpack(scores);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 1 &&
                  x.is_contiguous(),
              op, ": scores must be a contiguous 1-D float32 CPU tensor");
  const int64_t n = x.numel();
  TORCH_CHECK(k >= 0 && k <= n, op, ": k must lie in [0, ", n, "], got ", k);

  const float* v = x.const_data_ptr<float>();
  std::vector<uint32_t> keys(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) keys[size_t(i)] = select::abs_key32(v[i]);
  cuda::SelState st = cuda::start_state(k, n, approx != 0);
  std::vector<unsigned long long> hist(cuda::kSelectBins);
  int levels = 0;
  for (int level = 0; level < 3 && !st.done; ++level, ++levels) {
    std::fill(hist.begin(), hist.end(), 0ull);
    const int low = cuda::level_low(level), nbins = 1 << cuda::level_bits(level);
    for (const uint32_t key : keys)
      if (cuda::in_level(key, st.prefix, level)) ++hist[(key >> low) & uint32_t(nbins - 1)];
    unsigned long long above = 0;
    const int bin = cuda::walk_bins(hist.data(), nbins - 1, nbins,
                                    static_cast<unsigned long long>(st.r), above);
    cuda::settle_digit(st, uint32_t(bin), int64_t(above), int64_t(hist[size_t(bin)]), level);
  }
  const bool tie = !st.done;
  if (tie) {  // the r-th of the keys equal to T, in position order
    int64_t seen = 0;
    for (int64_t i = 0; i < n; ++i)
      if (keys[size_t(i)] == st.threshold && ++seen == st.r) {
        st.last_pos = i;
        break;
      }
    st.done = 1;
  }
  std::vector<int64_t> chosen;
  for (int64_t i = 0; i < n; ++i)
    if (cuda::chosen(st, keys[size_t(i)], i)) chosen.push_back(i);
  at::Tensor out = at::empty({int64_t(chosen.size())}, at::TensorOptions().dtype(at::kLong));
  if (!chosen.empty())
    std::memcpy(out.data_ptr<int64_t>(), chosen.data(), chosen.size() * sizeof(int64_t));
  return Py_BuildValue("(NiO)", THPVariable_Wrap(std::move(out)), levels,
                       tie ? Py_True : Py_False);
  END_HANDLE_TH_ERRORS
}

}  // namespace

PyMethodDef kRadixOnHostMethods[] = {
    {"cuda_radix_on_host", cuda_radix_on_host, METH_VARARGS,
     "(scores, k, approx) -> (positions, levels, tie): the CUDA radix select's digit "
     "logic run on the host over |scores| (a 1-D float32 CPU tensor), for the tests."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace incrkern
