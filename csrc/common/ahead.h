// Passes over the metadata of many tensors. A model of thousands of params has tens of
// thousands of TensorImpls, more than L2 holds, and once a step's streams have gone
// through the cache each one is a wait on memory; a pass that reads one, then the
// object it points to (its storage), waits once per level and per tensor. These
// requests run ahead of such a pass: the TensorImpl kTensorsAhead entries further on,
// and the object behind it when the pass is half as far.
#pragma once

#include <c10/core/TensorImpl.h>

#include <cstdint>

#include "common/prefetched.h"

namespace incrkern {

constexpr size_t kTensorsAhead = 16;

// Every line of an object requested to L2.
inline void request_object(const void* address, size_t bytes) {
  const auto first = reinterpret_cast<uintptr_t>(address) & ~uintptr_t(63);
  const auto last = (reinterpret_cast<uintptr_t>(address) + bytes - 1) & ~uintptr_t(63);
  for (uintptr_t line = first; line <= last; line += 64)
    request_line(reinterpret_cast<const void*>(line));
}

inline void request_impl(const at::Tensor& t) {
  request_object(t.unsafeGetTensorImpl(), sizeof(c10::TensorImpl));
}

// The storage behind t (where its data pointer is read), once its TensorImpl is here.
inline void request_storage(const at::Tensor& t) {
  request_object(t.unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl(),
                 sizeof(c10::StorageImpl));
}

// The version counter behind t (a separate object, bumped where the tensor is written),
// once its TensorImpl is here. VariableVersion keeps its counter private behind one
// pointer; read as that pointer only to request the line, which never faults.
inline void request_version(const at::Tensor& t) {
  static_assert(sizeof(c10::VariableVersion) == sizeof(void*));
  request_line(*reinterpret_cast<void* const*>(&t.unsafeGetTensorImpl()->version_counter()));
}

// At entry i of a pass over `tensors`: entry i + kTensorsAhead's TensorImpl requested,
// and `then` (request_storage, or nothing) for entry i + kTensorsAhead / 2.
template <typename Then>
inline void request_tensors_ahead(at::TensorList tensors, size_t i, Then&& then) {
  if (i + kTensorsAhead < tensors.size()) request_impl(tensors[i + kTensorsAhead]);
  if (i + kTensorsAhead / 2 < tensors.size()) then(tensors[i + kTensorsAhead / 2]);
}

inline void request_tensors_ahead(at::TensorList tensors, size_t i) {
  request_tensors_ahead(tensors, i, [](const at::Tensor&) {});
}

}  // namespace incrkern
