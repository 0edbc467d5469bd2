// Compile check of transport/gin_transport.cuh (make gin-check): nvcc sm_90 with NCCL's device
// headers, -Xptxas -v parsed by tools/check_ptxas.py (no spills, no stack). Never run here (no
// GPU, no NIC); the kernel is written the way the internode kernels use a Transport, so ptxas sees
// the same NCCL code paths they will.

#include "../common/compat.cuh"
#include "../common/ptx.cuh"
#include "../transport/gin_transport.cuh"

namespace epcomm::test {

// One warp per rank, a ring: stage a row at [0, row_bytes) of this rank's RDMA buffer, put it to
// [row_bytes, 2 * row_bytes) of the next rank with +1 on `signal`, wait for the previous rank's row
// (the signal reaching `expected`: signals only grow, so a caller counts launches), check it, and
// flush before the staging row may be reused. Counts wrong bytes into *mismatches.
template <class Transport>
EPCOMM_GLOBAL EPCOMM_LAUNCH_BOUNDS(32) void row_exchange_kernel(Transport transport, size_t row_bytes, int signal,
                                                                 uint64_t expected, int* mismatches) {
  int const lane = int(ptx::get_lane_id());
  int const rank = transport.rank();
  int const next = (rank + 1) % transport.num_ranks();
  int const previous = (rank + transport.num_ranks() - 1) % transport.num_ranks();
  char* buffer = transport.local_buffer();

  // Stage the row (the put orders these writes before its work request).
  for (size_t i = lane; i < row_bytes; i += 32) buffer[i] = char(rank + i);
  transport.put_signal(transport::WarpCoop{lane}, next, row_bytes, 0, row_bytes, signal, 1);

  // Every lane acquires the signal itself, so each lane's reads of the row come after it.
  while (transport.read_signal(signal) < expected) ptx::nanosleep_ns(64);
  int wrong = 0;
  for (size_t i = lane; i < row_bytes; i += 32) wrong += buffer[row_bytes + i] != char(previous + i);
  if (wrong != 0) atomicAdd(mismatches, wrong);

  transport.flush(transport::WarpCoop{lane});
}

// The launcher instantiates the kernel for the GIN transport, as the internode launchers will.
int launch_row_exchange(transport::GinTransport const& transport, size_t row_bytes, int signal, uint64_t expected,
                        int* mismatches, cudaStream_t stream) {
  row_exchange_kernel<<<1, 32, 0, stream>>>(transport, row_bytes, signal, expected, mismatches);
  return int(cudaGetLastError());
}

}  // namespace epcomm::test
