// The co-residency rule and its message (kernels/co_residency.hpp): a channel kernel's grid must fit the
// device at once (its blocks wait on each other); a grid that does not is refused before launch with a
// message naming the SMs it needs and the Config that fits. The device query itself needs a GPU.
#include <string>

#include "../kernels/co_residency.hpp"
#include "harness.hpp"

using namespace epcomm;

EPCOMM_TEST(co_residency_rule_and_message) {
  // 10 channels x 2 blocks on an H100's 132 SMs: a block per SM, no occupancy query needed
  kernels::CoResidency intranode{"intranode_dispatch", 10, 2, 768, 132, 0};
  CHECK(intranode.fits_without_occupancy() && intranode.fits_at_once());
  // 64 channels x 3 blocks: 192 blocks; at 2 blocks/SM they fit 132 SMs, at 1 they need 192
  kernels::CoResidency internode{"internode_dispatch", 64, 3, 1024, 132, 2};
  CHECK(!internode.fits_without_occupancy() && internode.fits_at_once());
  internode.blocks_per_sm = 1;
  CHECK(!internode.fits_at_once());
  CHECK_EQ(internode.sms_needed(), 192);
  std::string const text = kernels::describe_co_residency(internode);
  CHECK_CONTAINS(text, "internode_dispatch needs its 3 x C blocks co-resident");
  CHECK_CONTAINS(text, "C=64 channels -> 192 blocks of 1024 threads at 1 blocks/SM -> 192 SMs, the device has 132 SMs");
  // 132 / 3 = 44 channels fit: Config(num_sms=88)
  CHECK_CONTAINS(text, "Config(num_sms=N) runs N / 2 channels; N <= 88 fits this device");
  internode.blocks_per_sm = 0;
  CHECK_CONTAINS(kernels::describe_co_residency(internode), "no SM can hold one such block");
  kernels::CoResidency tiny{"internode_combine", 1, 3, 1024, 2, 1};  // a 2-SM partition: not even one channel
  CHECK(!tiny.fits_at_once());
  CHECK_CONTAINS(kernels::describe_co_residency(tiny), "Not even one channel fits this device");
}
