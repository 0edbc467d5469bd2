#pragma once
// R fake ranks on one Device: each rank's buffers, the peer tables the kernels index (plain device
// pointers to the other fake ranks' buffers), the ErrorSlots (host-mapped), and a step runner that
// launches every rank's grid before waiting for any. IntranodeCluster: one node, NVL buffers;
// InternodeCluster: NN nodes x L ranks, NVL buffers per node plus RDMA buffers behind ShmTransport.

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "../../kernels/internode.hpp"
#include "../../kernels/intranode.hpp"
#include "../test_common.hpp"
#include "device.hpp"
#include "device_data.hpp"

namespace epcomm::gpu_check {

// R zeroed ErrorSlots in host-mapped memory: the kernels write them, the host reads them after a step.
class ErrorSlots {
 public:
  ErrorSlots(Device& device, int num_ranks)
      : device_(device), memory_(device.allocate_mapped(sizeof(kernels::ErrorSlot) * size_t(num_ranks))),
        num_ranks_(num_ranks) {}
  ~ErrorSlots() {
    if (device_.unusable_reason().empty()) device_.release_mapped(memory_);  // else a grid may still write it
  }
  ErrorSlots(ErrorSlots const&) = delete;
  ErrorSlots& operator=(ErrorSlots const&) = delete;

  kernels::ErrorSlot* kernel_view(int rank) const { return static_cast<kernels::ErrorSlot*>(memory_.device) + rank; }
  kernels::ErrorSlot read(int rank) const { return static_cast<kernels::ErrorSlot const*>(memory_.host)[rank]; }
  // One line per rank whose slot is filled ("" when none is).
  std::string report() const {
    std::string text;
    for (int rank = 0; rank < num_ranks_; ++rank)
      if (read(rank).code != 0) text += "  " + test::error_text(read(rank)) + "\n";
    return text;
  }

 private:
  Device& device_;
  MappedMemory memory_;
  int num_ranks_;
};

// Runs one step over `ranks` (launch_rank(rank) launches that rank's grid) and returns how it ended.
// Unless `expect_kernel_errors`, any launch problem, unfinished grid or filled ErrorSlot throws CheckFailed.
template <class LaunchRank>
StepOutcome run_step(Device& device, ErrorSlots const& slots, char const* name, std::vector<int> const& ranks,
                     double host_limit_s, LaunchRank&& launch_rank, bool expect_kernel_errors = false) {
  int const num_streams = ranks.empty() ? 0 : *std::max_element(ranks.begin(), ranks.end()) + 1;
  device.begin_step(name, num_streams, host_limit_s);
  for (int rank : ranks) launch_rank(rank);
  StepOutcome const outcome = device.finish_step();
  std::string problems = outcome.launch_problems;
  if (!outcome.finished)
    problems += "the grids were still running " + std::to_string(int(host_limit_s)) + " s after the launch\n";
  if (!expect_kernel_errors) problems += slots.report();
  if (!problems.empty() && (!expect_kernel_errors || !outcome.ok()))
    throw CheckFailed(std::string("step '") + name + "' failed:\n" + problems);
  return outcome;
}

inline std::vector<int> all_ranks(int num_ranks) {
  std::vector<int> ranks(static_cast<size_t>(num_ranks));
  for (int r = 0; r < num_ranks; ++r) ranks[size_t(r)] = r;
  return ranks;
}

// Every fake rank's NVL buffer, laid out by one NvlWorkspace, and the table of them.
class IntranodeCluster {
 public:
  IntranodeCluster(Device& device, int num_ranks, kernels::KernelConfig const& config,
                   kernels::NvlWorkspaceShape const& shape, double timeout_s)
      : device_(device), config_(config), workspace_(shape, config), slots_(device, num_ranks),
        timeout_cycles_((long long)(timeout_s * device.clock_ticks_per_second())) {
    if (char const* problem = kernels::validate_config(config, num_ranks)) throw CheckFailed(problem);
    std::vector<void*> pointers;
    for (int r = 0; r < num_ranks; ++r) {
      buffers_.emplace_back(device, workspace_.required_bytes());
      pointers.push_back(buffers_.back().get());
    }
    peer_table_ = upload(device, pointers);
  }

  int num_ranks() const { return int(buffers_.size()); }
  kernels::KernelConfig const& config() const { return config_; }
  ErrorSlots const& slots() const { return slots_; }
  void set_timeout(double seconds) { timeout_cycles_ = (long long)(seconds * device_.clock_ticks_per_second()); }

  kernels::CommArgs comm(int rank) const {
    kernels::CommArgs comm;
    comm.rank = rank;
    comm.num_ranks = num_ranks();
    comm.config = config_;
    comm.workspace = workspace_;
    comm.peer_buffers = peer_table_.get<void* const>();
    comm.error = slots_.kernel_view(rank);
    comm.timeout_cycles = timeout_cycles_;
    return comm;
  }

 private:
  Device& device_;
  kernels::KernelConfig config_;
  kernels::NvlWorkspace workspace_;
  std::vector<DeviceBuffer> buffers_;
  DeviceBuffer peer_table_;  // [R] void*
  ErrorSlots slots_;
  long long timeout_cycles_;
};

// NN nodes x L fake ranks: NVL buffers (one table per node, by local rank), RDMA buffers (one table
// of all R, what ShmTransport puts into), and the transport's byte counters [R][link class].
class InternodeCluster {
 public:
  InternodeCluster(Device& device, int num_nodes, int num_nvl_ranks, kernels::InternodeConfig const& config,
                   kernels::NvlWorkspaceShape const& nvl_shape, kernels::RdmaWorkspaceShape const& rdma_shape,
                   double timeout_s)
      : device_(device), num_nvl_ranks_(num_nvl_ranks), config_(config), nvl_workspace_(nvl_shape, config.nvl),
        rdma_workspace_(rdma_shape, config), slots_(device, num_nodes * num_nvl_ranks),
        timeout_cycles_((long long)(timeout_s * device.clock_ticks_per_second())) {
    if (char const* problem = kernels::validate_rdma_shape(rdma_shape, config)) throw CheckFailed(problem);
    int const R = num_nodes * num_nvl_ranks;
    std::vector<char*> rdma_pointers;
    for (int node = 0; node < num_nodes; ++node) {
      std::vector<void*> node_pointers;
      for (int local = 0; local < num_nvl_ranks; ++local) {
        nvl_buffers_.emplace_back(device, nvl_workspace_.required_bytes());
        node_pointers.push_back(nvl_buffers_.back().get());
        rdma_buffers_.emplace_back(device, rdma_workspace_.required_bytes());
        rdma_pointers.push_back(rdma_buffers_.back().get<char>());
      }
      node_tables_.push_back(upload(device, node_pointers));
    }
    rdma_table_ = upload(device, rdma_pointers);
    counters_ = DeviceBuffer(device, sizeof(uint64_t) * size_t(R) * transport::kNumLinkClasses);
  }

  int num_ranks() const { return int(rdma_buffers_.size()); }
  kernels::RdmaWorkspace const& rdma_workspace() const { return rdma_workspace_; }
  ErrorSlots const& slots() const { return slots_; }

  kernels::InternodeComm<Shm> comm(int rank) const {
    kernels::InternodeComm<Shm> comm;
    comm.rank = rank;
    comm.num_ranks = num_ranks();
    comm.num_nvl_ranks = num_nvl_ranks_;
    comm.config = config_;
    comm.nvl_workspace = nvl_workspace_;
    comm.rdma_workspace = rdma_workspace_;
    comm.nvl_peer_buffers = node_tables_[size_t(rank / num_nvl_ranks_)].get<void* const>();
    comm.transport = Shm{rank, num_ranks(), num_nvl_ranks_, rdma_table_.get<char* const>(),
                         rdma_workspace_.signals_offset,
                         counters_.get<uint64_t>() + size_t(rank) * transport::kNumLinkClasses};
    comm.error = slots_.kernel_view(rank);
    comm.timeout_cycles = timeout_cycles_;
    return comm;
  }

  // Bytes all ranks put since the last call, per link class (transport::LinkClass), as the transport counted.
  std::vector<uint64_t> take_link_bytes() {
    size_t const count = size_t(num_ranks()) * transport::kNumLinkClasses;
    std::vector<uint64_t> const per_rank = download<uint64_t>(device_, counters_, count);
    std::vector<uint64_t> totals(transport::kNumLinkClasses, 0);
    for (size_t i = 0; i < count; ++i) totals[i % transport::kNumLinkClasses] += per_rank[i];
    device_.copy_to_device(counters_.get(), std::vector<uint64_t>(count, 0).data(), count * sizeof(uint64_t));
    return totals;
  }

 private:
  Device& device_;
  int num_nvl_ranks_;
  kernels::InternodeConfig config_;
  kernels::NvlWorkspace nvl_workspace_;
  kernels::RdmaWorkspace rdma_workspace_;
  std::vector<DeviceBuffer> nvl_buffers_, rdma_buffers_;  // [R]
  std::vector<DeviceBuffer> node_tables_;                 // [NN] of L void*
  DeviceBuffer rdma_table_;                               // [R] char*
  DeviceBuffer counters_;                                 // [R][kNumLinkClasses] uint64
  ErrorSlots slots_;
  long long timeout_cycles_;
};

}  // namespace epcomm::gpu_check
