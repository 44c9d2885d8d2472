#include "snapshot.h"

#include <algorithm>
#include <limits>
#include <unordered_set>

namespace swapserve {

namespace {
constexpr uint64_t kInactive = std::numeric_limits<uint64_t>::max();
}  // namespace

// One reader slot, padded to a cache line so readers never share a line.
struct alignas(64) EpochSlot {
  std::atomic<uint64_t> epoch{kInactive};  // announced epoch, kInactive outside guards
  std::atomic<bool> in_use{false};         // owned by a live thread
  EpochSlot* next = nullptr;               // immutable once pushed on the domain list
  int depth = 0;                           // guard nesting; touched by the owner thread only
};

namespace {
// Gives the thread's slot back to the domain when the thread exits.
struct SlotOwner {
  EpochSlot* slot = nullptr;  // borrowed from the domain (slots are never freed)
  ~SlotOwner() {
    if (slot != nullptr) {
      slot->epoch.store(kInactive, std::memory_order_release);
      slot->in_use.store(false, std::memory_order_release);
    }
  }
};
}  // namespace

EpochDomain& EpochDomain::Global() {
  static EpochDomain* domain = new EpochDomain();  // leaked on purpose (see header)
  return *domain;
}

bool EpochDomain::AtomicsAreLockFree() {
  std::atomic<uint64_t> u{0};
  std::atomic<const void*> p{nullptr};
  std::atomic<bool> b{false};
  std::atomic<EpochSlot*> s{nullptr};
  return u.is_lock_free() && p.is_lock_free() && b.is_lock_free() && s.is_lock_free();
}

EpochSlot* EpochDomain::AcquireSlot() {
  for (EpochSlot* s = slots_.load(std::memory_order_acquire); s != nullptr; s = s->next) {
    bool expected = false;
    if (!s->in_use.load(std::memory_order_relaxed) &&
        s->in_use.compare_exchange_strong(expected, true, std::memory_order_acq_rel))
      return s;
  }
  auto* s = new EpochSlot();
  s->in_use.store(true, std::memory_order_relaxed);
  EpochSlot* head = slots_.load(std::memory_order_relaxed);
  do {
    s->next = head;
  } while (!slots_.compare_exchange_weak(head, s, std::memory_order_release, std::memory_order_relaxed));
  return s;
}

EpochSlot* EpochDomain::ThreadSlot() {
  thread_local SlotOwner owner;
  if (owner.slot == nullptr) owner.slot = AcquireSlot();
  return owner.slot;
}

EpochDomain::ReadGuard::ReadGuard() : slot_(Global().ThreadSlot()) {
  if (slot_->depth++ == 0)
    slot_->epoch.store(Global().epoch_.load(std::memory_order_seq_cst), std::memory_order_seq_cst);
}

EpochDomain::ReadGuard::~ReadGuard() {
  if (--slot_->depth == 0) slot_->epoch.store(kInactive, std::memory_order_release);
}

void EpochDomain::Retire(const void* p, void (*deleter)(const void*)) {
  if (p == nullptr) return;
  std::lock_guard<std::mutex> lock(retire_mu_);
  // After the caller's unlinking exchange in the seq_cst order (see header).
  uint64_t r = epoch_.fetch_add(1, std::memory_order_seq_cst);
  retired_.push_back({p, deleter, r});
}

size_t EpochDomain::Collect() {
  std::vector<Retired> freeable;
  size_t left;
  {
    std::lock_guard<std::mutex> lock(retire_mu_);
    if (retired_.empty()) return 0;
    uint64_t min_epoch = kInactive;
    for (EpochSlot* s = slots_.load(std::memory_order_acquire); s != nullptr; s = s->next)
      min_epoch = std::min(min_epoch, s->epoch.load(std::memory_order_seq_cst));
    auto keep = std::partition(retired_.begin(), retired_.end(),
                               [min_epoch](const Retired& r) { return r.epoch >= min_epoch; });
    freeable.assign(keep, retired_.end());
    retired_.erase(keep, retired_.end());
    left = retired_.size();
  }
  // Delete outside the lock: destructors may be slow (maps, shared tables).
  for (const Retired& r : freeable) r.deleter(r.p);
  return left;
}

size_t EpochDomain::Pending() {
  std::lock_guard<std::mutex> lock(retire_mu_);
  return retired_.size();
}

// ---------------------------------------------------------------------------

Status RoutingTable::Create(const std::string& model, RoutingSpec spec, std::shared_ptr<const RoutingTable>* out) {
  auto bad = [&model](const std::string& what) {
    return Status::InvalidArgument("routing spec for model '" + model + "' is invalid: " + what);
  };
  if (model.empty()) return Status::InvalidArgument("routing spec has an empty model name; name the model");
  if (spec.versions.empty()) return bad("no live versions; list at least one version with weight 10000");
  if (spec.versions.size() != spec.weights_bp.size())
    return bad("versions has " + std::to_string(spec.versions.size()) + " entries but weights_bp has " +
               std::to_string(spec.weights_bp.size()) + "; give one weight per version");
  if (spec.key_attribute.empty()) return bad("key_attribute is empty; use e.g. 'routing_key'");

  std::unordered_set<int64_t> seen;
  int64_t sum = 0;
  auto table = std::shared_ptr<RoutingTable>(new RoutingTable());
  for (size_t i = 0; i < spec.versions.size(); ++i) {
    int64_t v = spec.versions[i], w = spec.weights_bp[i];
    if (v < 0) return bad("version " + std::to_string(v) + " is negative; versions are non-negative integers");
    if (!seen.insert(v).second)
      return bad("version " + std::to_string(v) + " is listed twice; list each live version once");
    if (w < 0 || w > static_cast<int64_t>(kBuckets))
      return bad("weight " + std::to_string(w) + " of version " + std::to_string(v) +
                 " is outside [0, 10000] basis points");
    sum += w;
    table->cumulative_.push_back(static_cast<uint32_t>(sum));
  }
  if (sum != kBuckets)
    return bad("weights_bp sum to " + std::to_string(sum) + ", not 10000; weights are basis points of traffic");

  std::unordered_set<int64_t> shadow_seen;
  for (int64_t s : spec.shadows) {
    if (s < 0) return bad("shadow version " + std::to_string(s) + " is negative");
    if (!shadow_seen.insert(s).second) return bad("shadow version " + std::to_string(s) + " is listed twice");
  }
  for (const CohortRule& c : spec.cohorts) {
    if (c.attribute.empty()) return bad("a cohort rule has an empty attribute name");
    if (c.version < 0)
      return bad("cohort rule " + c.attribute + "==" + c.value + " routes to negative version " +
                 std::to_string(c.version));
  }
  table->spec_ = std::move(spec);
  *out = std::move(table);
  return Status::Ok();
}

}  // namespace swapserve
