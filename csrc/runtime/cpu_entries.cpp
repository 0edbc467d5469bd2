// The kernels as cpu-runtime entries, for the sim backend (epcomm/backends/sim_backend.py): grids
// run through the SIMT layer on the calling thread. One node: the intranode entries; several
// (emulated) nodes: the internode entries over ShmTransport (every rank's buffer is mapped by every
// rank through POSIX shared memory, standing in for the network); the low-latency entries over the same.

#include "../transport/shm_transport.cuh"
#include "cpu_target.hpp"
#include "internode_entries.hpp"
#include "intranode_entries.hpp"
#include "low_latency_entries.hpp"

namespace epcomm::runtime {

namespace {

struct RegisterCpuEntries {
  RegisterCpuEntries() {
    entries::register_intranode_entries<CpuTarget>();
    entries::register_internode_entries<CpuTarget, transport::ShmTransport>();
    entries::register_low_latency_entries<CpuTarget, transport::ShmTransport>();
  }
} const register_cpu_entries;

}  // namespace

}  // namespace epcomm::runtime
