#pragma once
// Moving arrays between the host and a Device, and comparing what came back with the reference: the
// first difference of a check is its failure message.

#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "device.hpp"

namespace epcomm::gpu_check {

// A check's failure: its message is the verdict's detail.
class CheckFailed : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

template <class T>
DeviceBuffer upload(Device& device, std::vector<T> const& values) {
  DeviceBuffer buffer(device, values.size() * sizeof(T));
  device.copy_to_device(buffer.get(), values.data(), values.size() * sizeof(T));
  return buffer;
}

template <class T>
std::vector<T> download(Device& device, DeviceBuffer const& buffer, size_t count) {
  std::vector<T> values(count);
  device.copy_to_host(values.data(), buffer.get(), count * sizeof(T));
  return values;
}

// An output array filled with `sentinel`: a kernel that skips a write cannot pass for one that wrote zeros.
template <class T>
DeviceBuffer sentinel_filled(Device& device, size_t count, T sentinel) {
  return upload(device, std::vector<T>(count, sentinel));
}

// The first difference of two arrays, bit for bit, for a failure message ("" when equal).
template <class T>
std::string first_difference(char const* what, int rank, std::vector<T> const& got, std::vector<T> const& want) {
  if (got.size() != want.size())
    return std::string(what) + " of rank " + std::to_string(rank) + ": " + std::to_string(got.size()) +
           " entries, expected " + std::to_string(want.size());
  if (got.empty() || std::memcmp(got.data(), want.data(), got.size() * sizeof(T)) == 0) return "";
  for (size_t i = 0; i < got.size(); ++i)
    if (std::memcmp(&got[i], &want[i], sizeof(T)) != 0)
      return std::string(what) + " of rank " + std::to_string(rank) + " differs first at entry " + std::to_string(i) +
             " of " + std::to_string(got.size());
  return "";
}

// Fails the check unless the first want.size() entries of `buffer` equal `want`.
template <class T>
void expect_equal(Device& device, char const* what, int rank, DeviceBuffer const& buffer, std::vector<T> const& want) {
  std::string const difference = first_difference(what, rank, download<T>(device, buffer, want.size()), want);
  if (!difference.empty()) throw CheckFailed(difference);
}

}  // namespace epcomm::gpu_check
