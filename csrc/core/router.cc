#include "router.h"

#include <algorithm>
#include <chrono>
#include <functional>
#include <random>
#include <thread>

namespace swapserve {

uint64_t Fnv1a64(std::string_view bytes) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (unsigned char b : bytes) {
    h ^= b;
    h *= 0x100000001b3ULL;
  }
  return h;
}

uint64_t Mix64(uint64_t z) {
  z ^= z >> 30;
  z *= 0xbf58476d1ce4e5b9ULL;
  z ^= z >> 27;
  z *= 0x94d049bb133111ebULL;
  z ^= z >> 31;
  return z;
}

namespace {

// Per-thread splitmix64 stream for requests with neither key nor request id.
uint32_t RandomBucket() {
  thread_local uint64_t state =
      std::random_device{}() ^ (static_cast<uint64_t>(std::hash<std::thread::id>{}(std::this_thread::get_id())) << 1) ^
      static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  state += 0x9e3779b97f4a7c15ULL;
  return static_cast<uint32_t>(Mix64(state) % RoutingTable::kBuckets);
}

Status UnknownModel(const std::string& model) {
  return Status::NotFound("model '" + model +
                          "' has no routing snapshot; publish one (load a version and set its traffic) first");
}

}  // namespace

Status VectorAttributes::Get(const std::string& name, bool* found, std::string* canonical) const {
  for (const auto& kv : items) {
    if (kv.first == name) {
      *found = true;
      *canonical = kv.second;
      return Status::Ok();
    }
  }
  *found = false;
  return Status::Ok();
}

Router::Router() : cell_(std::make_unique<const RouterState>()) {}

Status Router::Publish(const std::string& model, RoutingSpec spec) {
  const uint64_t generation = spec.generation;
  std::shared_ptr<const RoutingTable> table;
  SWAPSERVE_RETURN_IF_ERROR(RoutingTable::Create(model, std::move(spec), &table));
  std::lock_guard<std::mutex> lock(write_mu_);
  // Under write_mu_ no one else can retire the current state, so no guard is needed.
  const RouterState* cur = cell_.Load();
  auto it = cur->models.find(model);
  if (it != cur->models.end() && generation <= it->second->spec().generation)
    return Status::FailedPrecondition("stale routing snapshot for model '" + model + "': generation " +
                                      std::to_string(generation) + " <= current generation " +
                                      std::to_string(it->second->spec().generation) +
                                      "; publish with a higher generation");
  auto next = std::make_unique<RouterState>(*cur);
  next->models[model] = std::move(table);
  cell_.Publish(std::move(next));
  return Status::Ok();
}

Status Router::Remove(const std::string& model, bool* removed) {
  std::lock_guard<std::mutex> lock(write_mu_);
  const RouterState* cur = cell_.Load();
  *removed = cur->models.count(model) > 0;
  if (!*removed) return Status::Ok();
  auto next = std::make_unique<RouterState>(*cur);
  next->models.erase(model);
  cell_.Publish(std::move(next));
  return Status::Ok();
}

Status Router::Route(const std::string& model, const AttributeSource& attrs, std::string_view request_id,
                     RouteResult* out) const {
  EpochDomain::ReadGuard guard;
  const RouterState* state = cell_.Load();
  auto it = state->models.find(model);
  if (it == state->models.end()) return UnknownModel(model);
  const RoutingTable& table = *it->second;
  const RoutingSpec& spec = table.spec();

  bool found = false;
  std::string value;
  int64_t version = -1;
  for (const CohortRule& rule : spec.cohorts) {
    SWAPSERVE_RETURN_IF_ERROR(attrs.Get(rule.attribute, &found, &value));
    if (found && value == rule.value) {
      version = rule.version;
      break;
    }
  }
  if (version < 0) {
    SWAPSERVE_RETURN_IF_ERROR(attrs.Get(spec.key_attribute, &found, &value));
    uint32_t bucket = found                ? BucketOf(value)
                      : !request_id.empty() ? BucketOf(request_id)
                                            : RandomBucket();
    version = table.VersionForBucket(bucket);
  }
  out->version = version;
  out->generation = spec.generation;
  out->shadows.clear();
  for (int64_t s : spec.shadows)
    if (s != version) out->shadows.push_back(s);
  return Status::Ok();
}

Status Router::RouteKeys(const std::string& model, const std::vector<std::string>& keys,
                         std::vector<int64_t>* out) const {
  EpochDomain::ReadGuard guard;
  const RouterState* state = cell_.Load();
  auto it = state->models.find(model);
  if (it == state->models.end()) return UnknownModel(model);
  const RoutingTable& table = *it->second;
  out->resize(keys.size());
  for (size_t i = 0; i < keys.size(); ++i) (*out)[i] = table.VersionForBucket(BucketOf(keys[i]));
  return Status::Ok();
}

bool Router::Snapshot(const std::string& model, RoutingSpec* out) const {
  EpochDomain::ReadGuard guard;
  const RouterState* state = cell_.Load();
  auto it = state->models.find(model);
  if (it == state->models.end()) return false;
  *out = it->second->spec();
  return true;
}

std::vector<std::string> Router::Models() const {
  EpochDomain::ReadGuard guard;
  const RouterState* state = cell_.Load();
  std::vector<std::string> names;
  names.reserve(state->models.size());
  for (const auto& kv : state->models) names.push_back(kv.first);
  std::sort(names.begin(), names.end());
  return names;
}

}  // namespace swapserve
