// Immutable routing snapshots and their wait-free publication.
//
// RECLAMATION SCHEME (epoch-based, one process-wide domain)
// ---------------------------------------------------------
// A SnapshotCell<T> holds `std::atomic<const T*>`. Readers enter an
// EpochDomain::ReadGuard, load the pointer, use the object, leave the guard.
// A writer swaps in a new object with ONE atomic exchange and retires the old one;
// the old one is deleted later, once no reader can still hold it.
//
//   * Every thread that reads owns one Slot (registered on first use, released at
//     thread exit, reused by later threads). Entering the outermost guard stores
//     the current global epoch into the slot; leaving stores kInactive.
//   * Retire(p): after the exchange that unlinked p, r = epoch.fetch_add(1);
//     p is queued with retire epoch r.
//   * Collect(): m = min over slots of the announced epoch (kInactive = max);
//     every queued p with r < m is deleted.
//
// Why it is safe (all five operations are seq_cst, so they sit in one total
// order S): a reader that obtained p loaded the pointer before the exchange that
// unlinked p, and announced epoch e before that load, having read e from the
// global epoch even earlier, so e <= r. A Collect after Retire(p) scans the slot
// after that announcement in S, so it sees e (<= r: p is kept) or the reader's
// release-store of kInactive (the reader is done: p may go). A reader that
// announces later loads the pointer after the exchange and cannot get p.
//
// Progress: readers are wait-free (a bounded number of plain atomic loads/stores,
// no CAS loop, no lock; slot registration happens once per thread). Writers never
// wait for readers: what cannot be freed yet stays queued for the next Collect.
// Memory held back is bounded by what was retired while a reader was inside a
// guard, and guards are held for one lookup.
//
// We do not use std::atomic<std::shared_ptr<T>>: libstdc++ implements it with a
// lock. The atomics used here are asserted lock-free below (and in the tests).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "status.h"

namespace swapserve {

static_assert(std::atomic<uint64_t>::is_always_lock_free, "epoch counters must be lock-free");
static_assert(std::atomic<const void*>::is_always_lock_free, "snapshot pointers must be lock-free");

struct EpochSlot;  // one per reading thread; defined in snapshot.cc

// Process-wide epoch reclamation domain. Intentionally never destroyed, so that
// thread-exit hooks and late Collect() calls never touch a dead object.
class EpochDomain {
 public:
  static EpochDomain& Global();

  // RAII read-side critical section; nests (only the outermost guard announces).
  // Pointers loaded from a SnapshotCell are valid until the guard is destroyed.
  class ReadGuard {
   public:
    ReadGuard();
    ~ReadGuard();
    ReadGuard(const ReadGuard&) = delete;
    ReadGuard& operator=(const ReadGuard&) = delete;

   private:
    EpochSlot* slot_;  // this thread's slot (owned by the domain, not by the guard)
  };

  // Queue `p` for deletion by `deleter` once no reader can hold it. The caller must
  // already have unlinked p (no new reader can reach it). Thread-safe.
  void Retire(const void* p, void (*deleter)(const void*));

  // Delete every retired object no reader can hold. Returns how many stay queued.
  size_t Collect();

  // Number of retired objects still queued (for tests and stats).
  size_t Pending();

  // Whether the atomics this domain and SnapshotCell use are lock-free at run time.
  static bool AtomicsAreLockFree();

 private:
  EpochDomain() = default;
  friend class ReadGuard;
  EpochSlot* ThreadSlot();
  EpochSlot* AcquireSlot();

  struct Retired {
    const void* p;                    // owned: deleted by `deleter` in Collect
    void (*deleter)(const void*);
    uint64_t epoch;                   // global epoch at retirement
  };

  std::atomic<uint64_t> epoch_{1};          // global epoch; readers announce it
  std::atomic<EpochSlot*> slots_{nullptr};  // lock-free list of reader slots; never freed
  std::mutex retire_mu_;                    // guards retired_ (writers only; readers never lock)
  std::vector<Retired> retired_;            // owned objects waiting for a safe point
};

// One atomically replaceable immutable object. Readers: Load() inside a ReadGuard.
// Writers: Publish(); the caller serialises writers if it does read-check-publish.
template <typename T>
class SnapshotCell {
 public:
  explicit SnapshotCell(std::unique_ptr<const T> initial) : current_(initial.release()) {}
  // Retires the current object. The owner guarantees no reader uses this cell any more.
  ~SnapshotCell() {
    EpochDomain::Global().Retire(current_.exchange(nullptr), &Delete);
    EpochDomain::Global().Collect();
  }
  SnapshotCell(const SnapshotCell&) = delete;
  SnapshotCell& operator=(const SnapshotCell&) = delete;

  // Current object; requires an active ReadGuard on this thread. Never null.
  const T* Load() const { return current_.load(std::memory_order_seq_cst); }

  // Make `next` visible to every later Load() with one atomic exchange; the old
  // object is retired and freed once no reader holds it. Never blocks readers.
  void Publish(std::unique_ptr<const T> next) {
    const T* old = current_.exchange(next.release(), std::memory_order_seq_cst);
    EpochDomain& d = EpochDomain::Global();
    d.Retire(old, &Delete);
    d.Collect();
  }

 private:
  static void Delete(const void* p) { delete static_cast<const T*>(p); }
  std::atomic<const T*> current_;  // owned; replaced by Publish, freed via the domain
};

// ---------------------------------------------------------------------------
// Routing data: a per-model table and the whole router state (model -> table).

enum class ValueKind : uint8_t { kString = 0, kInt = 1, kBool = 2 };

// `attribute == value` -> `version`. `value` is canonical text (see router.h).
struct CohortRule {
  std::string attribute;
  std::string value;
  ValueKind kind = ValueKind::kString;  // the type the operator wrote (for round trips)
  int64_t version = 0;
};

// What a publisher asks for; validated into a RoutingTable.
struct RoutingSpec {
  uint64_t generation = 0;
  std::vector<int64_t> versions;     // live versions, fixed order (the cumulative order)
  std::vector<int64_t> weights_bp;   // basis points, same length, sum exactly 10000
  std::vector<int64_t> shadows;      // versions that get a copy of traffic, never answer
  std::vector<CohortRule> cohorts;   // first match wins, before weights
  std::string key_attribute = "routing_key";
};

// Immutable, validated routing table of one model.
class RoutingTable {
 public:
  static constexpr uint32_t kBuckets = 10000;

  // Validate `spec` for `model`; the error message names the model and the problem.
  static Status Create(const std::string& model, RoutingSpec spec, std::shared_ptr<const RoutingTable>* out);

  const RoutingSpec& spec() const { return spec_; }
  // The live version owning `bucket` (< kBuckets): first i with bucket < cumulative[i].
  int64_t VersionForBucket(uint32_t bucket) const {
    for (size_t i = 0; i < cumulative_.size(); ++i)
      if (bucket < cumulative_[i]) return spec_.versions[i];
    return spec_.versions.back();  // unreachable: cumulative_.back() == kBuckets
  }

 private:
  RoutingTable() = default;
  RoutingSpec spec_;                 // as published (validated)
  std::vector<uint32_t> cumulative_;  // running sums of weights_bp
};

// The whole router state: one immutable map, republished on every change, so that
// adding or removing a model is as safe for readers as changing a split. Tables are
// shared between successive states; only writers touch the shared_ptr counts.
struct RouterState {
  std::unordered_map<std::string, std::shared_ptr<const RoutingTable>> models;
};

}  // namespace swapserve
