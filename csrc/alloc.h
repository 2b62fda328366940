// One allocation for all outputs of a call: on the CPU at::empty costs about 2,500 instructions a tensor (the
// dispatcher, the allocator, the storage), most of a small fast_weight_update call. Each output here is still a
// tensor of its own (its own storage of its own size, its own version counter), so autograd, torch.save (only its
// bytes), pickling and in-place use by the caller see ordinary tensors; only the memory is one block, released
// when the last of the outputs is. Their storages are not resizable (resize_ to a larger size raises), and on CUDA
// Tensor.record_stream does not reach the caching allocator: use them on the stream they were made on. Nor can
// they be sent to another process through CUDA IPC (torch.multiprocessing), which looks allocations up by their
// base pointer (read in the caching allocator: a map by exact pointer; not run, no GPU here): clone() one first.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/StorageImpl.h>
#include <c10/core/TensorImpl.h>
#include <c10/core/TensorOptions.h>
#include <c10/util/intrusive_ptr.h>

#include <vector>

namespace fastmeta {
namespace detail {

struct Block final : c10::intrusive_ptr_target {
  explicit Block(c10::DataPtr d) : data(std::move(d)) {}
  c10::DataPtr data;
};

inline void release_block(void* block) { c10::raw::intrusive_ptr::decref(static_cast<Block*>(block)); }

}  // namespace detail

// Each output starts on a 64-byte boundary (vector loads and stores; a cache line).
constexpr int64_t kOutputAlign = 64;

// Contiguous uninitialised tensors of the given sizes, dtype and device (the current device for CUDA: call under
// a device guard), in one allocation.
inline std::vector<at::Tensor> empty_many(
    const std::vector<c10::IntArrayRef>& sizes, c10::ScalarType dtype, c10::Device device) {
  const caffe2::TypeMeta meta = c10::scalarTypeToTypeMeta(dtype);
  const auto item = static_cast<int64_t>(meta.itemsize());
  std::vector<int64_t> offsets(sizes.size() + 1, 0), nbytes(sizes.size());
  for (size_t i = 0; i < sizes.size(); ++i) {
    nbytes[i] = c10::multiply_integers(sizes[i]) * item;
    offsets[i + 1] = offsets[i] + (nbytes[i] + kOutputAlign - 1) / kOutputAlign * kOutputAlign;
  }
  c10::Allocator* allocator = c10::GetAllocator(device.type());
  auto block = c10::make_intrusive<detail::Block>(allocator->allocate(offsets.back()));
  char* base = static_cast<char*>(block->data.get());
  const c10::Device where = block->data.device();
  const c10::DispatchKeySet keys(c10::computeDispatchKey(dtype, c10::kStrided, where));
  std::vector<at::Tensor> out;
  out.reserve(sizes.size());
  for (size_t i = 0; i < sizes.size(); ++i) {
    c10::raw::intrusive_ptr::incref(block.get());  // released by this output's storage
    c10::DataPtr data(base + offsets[i], block.get(), &detail::release_block, where);
    c10::Storage storage(c10::make_intrusive<c10::StorageImpl>(
        c10::StorageImpl::use_byte_size_t(), nbytes[i], std::move(data), /*allocator=*/nullptr,
        /*resizable=*/false));
    at::Tensor t = at::detail::make_tensor<c10::TensorImpl>(std::move(storage), keys, meta);
    t.unsafeGetTensorImpl()->set_sizes_contiguous(sizes[i]);
    out.push_back(std::move(t));
  }
  return out;
}

// empty_many with the sizes of `like` (dtype and device of like[0]).
inline std::vector<at::Tensor> empty_like_many(at::TensorList like) {
  if (like.empty()) return {};
  std::vector<c10::IntArrayRef> sizes;
  sizes.reserve(like.size());
  for (const auto& t : like) sizes.push_back(t.sizes());
  return empty_many(sizes, like[0].scalar_type(), like[0].device());
}

}  // namespace fastmeta
