#pragma once
// Warp collectives: __syncwarp, the __shfl_sync family, __ballot_sync,
// __any_sync / __all_sync and elect.sync, as a rendez-vous per warp keyed by
// the member mask.
//
// Disjoint sub-warp masks may be in flight at once; two in-flight masks that
// overlap without being equal are an error, as is a lane calling with a mask
// that does not contain it, or lanes of one mask calling different
// collectives. Lanes that exited count as arrived (as the hardware treats
// them). Only __syncwarp orders memory among its lanes; shuffles and votes
// exchange values through relaxed atomics and deliberately create no
// happens-before edge (neither does PTX), so ThreadSanitizer reports a
// shuffle used as a fence.

#include <atomic>
#include <bit>
#include <cstdio>
#include <string>

#include "errors.hpp"
#include "scheduler.hpp"
#include "sync_site.hpp"

namespace epcomm::simt {

enum class WarpOp : uint8_t { SyncWarp, Shuffle, Ballot, Any, All, Elect };

inline char const* warp_op_name(WarpOp op) {
  switch (op) {
    case WarpOp::SyncWarp: return "__syncwarp";
    case WarpOp::Shuffle: return "shuffle";
    case WarpOp::Ballot: return "ballot";
    case WarpOp::Any: return "__any_sync";
    case WarpOp::All: return "__all_sync";
    case WarpOp::Elect: return "elect_one_sync";
  }
  return "?";
}

class WarpCollectives {
 public:
  // `first_thread`: the warp's lane 0; lanes past the block's end are born exited.
  void init(Scheduler* scheduler, SimtThread* first_thread, uint32_t num_lanes) {
    scheduler_ = scheduler;
    lanes_ = first_thread;
    num_lanes_ = num_lanes;
    present_mask_ = num_lanes >= kWarpSize ? kFullWarpMask : (1u << num_lanes) - 1;
    exited_mask_.store(~present_mask_);
  }

  // The calling lane joins the collective `op` over `mask` with `value`;
  // for shuffles, `source_lane` says whose value it wants (outside the warp
  // or not taking part: it gets its own value back). Returns this lane's result.
  uint64_t exchange(WarpOp op, uint32_t mask, uint64_t value, uint32_t source_lane, char const* what,
                    SyncSite const& site) {
    SimtThread& me = scheduler_->current();
    uint32_t const lane = me.lane_idx;
    uint32_t const bit = 1u << lane;
    me.wait.record(SyncKind::WarpCollective, what, site, 0, mask, uint64_t(op));
    if (!(mask & bit)) throw InvalidUsage(describe(what, site, mask) + ": the calling lane " + std::to_string(lane) +
                                          " is not in its own member mask");
    Session& session = find_or_open(op, mask, what, site);
    value_[lane].store(value);
    source_lane_[lane].store(source_lane);
    pending_[lane].store(true);
    if (op == WarpOp::SyncWarp) session.order.fetch_add(1, std::memory_order_acq_rel);
    session.arrived.store(session.arrived.load() | bit);
    if (is_covered(session)) {
      complete(session);
      scheduler_->pass();
    } else {
      while (pending_[lane].load()) {
        me.state.store(RunState::Blocked);
        scheduler_->block();
      }
    }
    if (op == WarpOp::SyncWarp) (void)session.order.load(std::memory_order_acquire);
    return result_[lane].load();
  }

  // __activemask(): the lanes that have not exited. (The CPU cannot tell
  // which lanes are converged; treat it as "all live lanes".)
  uint32_t live_mask() const { return present_mask_ & ~exited_mask_.load(); }

  void on_lane_exit(uint32_t lane) {
    exited_mask_.store(exited_mask_.load() | (1u << lane));
    for (Session& session : sessions_) {
      if (session.mask.load() & (1u << lane) && is_covered(session)) complete(session);
    }
  }

  // For dumps: lanes of `mask`'s in-flight collective that have not arrived yet.
  uint32_t missing_lanes(uint32_t mask) const {
    for (Session const& session : sessions_) {
      if (session.mask.load() == mask) return mask & ~(session.arrived.load() | exited_mask_.load());
    }
    return 0;
  }

 private:
  struct Session {
    Relaxed<uint32_t> mask{0};  // 0: free slot
    Relaxed<uint32_t> arrived{0};
    Relaxed<WarpOp> op{WarpOp::SyncWarp};
    std::atomic<uint32_t> order{0};  // __syncwarp: arrivals chain their writes through this acq_rel counter
  };

  Session& find_or_open(WarpOp op, uint32_t mask, char const* what, SyncSite const& site) {
    Session* free_slot = nullptr;
    for (Session& session : sessions_) {
      uint32_t other = session.mask.load();
      if (other == mask) {
        if (session.op.load() != op)
          throw InvalidUsage(describe(what, site, mask) + ": other lanes of this mask are in " +
                             warp_op_name(session.op.load()) + " (lanes of one mask must call the same collective)");
        return session;
      }
      if (other & mask)
        throw InvalidUsage(describe(what, site, mask) + ": overlaps the member mask " + hex(other) +
                           " of a collective other lanes are in");
      if (!other && !free_slot) free_slot = &session;
    }
    free_slot->mask.store(mask);  // at most 32 disjoint non-empty masks: a slot is always free
    free_slot->arrived.store(0);
    free_slot->op.store(op);
    return *free_slot;
  }

  bool is_covered(Session const& session) const {
    uint32_t mask = session.mask.load();
    return mask && ((session.arrived.load() | exited_mask_.load()) & mask) == mask;
  }

  void complete(Session& session) {
    uint32_t const arrived = session.arrived.load();
    WarpOp const op = session.op.load();
    uint32_t votes = 0;
    for (uint32_t lane = 0; lane < kWarpSize; ++lane) {
      if (arrived >> lane & 1 && value_[lane].load() != 0) votes |= 1u << lane;
    }
    for (uint32_t lane = 0; lane < kWarpSize; ++lane) {
      if (!(arrived >> lane & 1)) continue;
      uint64_t result = 0;
      switch (op) {
        case WarpOp::SyncWarp: break;
        case WarpOp::Shuffle: {
          uint32_t source = source_lane_[lane].load();
          result = source < kWarpSize && arrived >> source & 1 ? value_[source].load() : value_[lane].load();
          break;
        }
        case WarpOp::Ballot: result = votes; break;
        case WarpOp::Any: result = votes != 0; break;
        case WarpOp::All: result = votes == arrived; break;
        case WarpOp::Elect: result = lane == uint32_t(std::countr_zero(arrived)); break;
      }
      result_[lane].store(result);
    }
    session.mask.store(0);
    for (uint32_t lane = 0; lane < kWarpSize; ++lane) {
      if (!(arrived >> lane & 1)) continue;
      pending_[lane].store(false);
      scheduler_->wake(lanes_[lane]);
    }
  }

  std::string describe(char const* what, SyncSite const& site, uint32_t mask) const {
    Dim3 const t = scheduler_->current().thread_idx;
    char buffer[512];
    std::snprintf(buffer, sizeof buffer, "%s(mask=0x%08x) at %s:%u (%s), thread (%u,%u,%u)", what, mask,
                  site.file_name(), unsigned(site.line()), site.function_name(), t.x, t.y, t.z);
    return buffer;
  }
  static std::string hex(uint32_t mask) {
    char buffer[16];
    std::snprintf(buffer, sizeof buffer, "0x%08x", mask);
    return buffer;
  }

  Scheduler* scheduler_ = nullptr;
  SimtThread* lanes_ = nullptr;
  uint32_t num_lanes_ = 0;
  uint32_t present_mask_ = 0;
  Relaxed<uint32_t> exited_mask_{0};
  Session sessions_[kWarpSize];
  // Per lane: a lane is in at most one collective at a time.
  Relaxed<uint64_t> value_[kWarpSize];
  Relaxed<uint32_t> source_lane_[kWarpSize];
  Relaxed<uint64_t> result_[kWarpSize];
  Relaxed<bool> pending_[kWarpSize];
};

}  // namespace epcomm::simt
