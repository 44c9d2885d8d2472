// Router: (model, request attributes, request id) -> serving version, shadows, generation.
//
// ROUTING (identical in swapserve/routing/reference.py):
//   1. Cohort rules, in order: the first rule whose attribute is present with
//      canonical text equal to the rule's value wins (so 42 and "42" match).
//   2. Otherwise a routing key: attributes[key_attribute] if present, else the
//      request id if non-empty, else a per-thread pseudo-random number.
//   3. Canonical key bytes: str -> UTF-8; int -> decimal text ("-12"); bool ->
//      "true"/"false"; float -> Python repr (done in bindings, e.g. "0.5").
//   4. Hash64(bytes) = mix64(fnv1a64(bytes)) where
//        fnv1a64: h = 0xcbf29ce484222325; for each byte b: h ^= b; h *= 0x100000001b3
//        mix64 (splitmix64 finaliser, no gamma step):
//          z ^= z >> 30; z *= 0xbf58476d1ce4e5b9; z ^= z >> 27; z *= 0x94d049bb133111eb; z ^= z >> 31
//      (all arithmetic mod 2^64). bucket = Hash64 % 10000.
//   5. Version = the first live version i (in the published order) with
//      bucket < weights_bp[0] + ... + weights_bp[i]. Moving basis points from
//      version i to version i+1 therefore only moves keys from i to i+1.
//   Shadows returned = the spec's shadows minus the version that serves.
#pragma once

#include <cstdint>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "snapshot.h"
#include "status.h"

namespace swapserve {

uint64_t Fnv1a64(std::string_view bytes);
uint64_t Mix64(uint64_t z);
inline uint64_t Hash64(std::string_view bytes) { return Mix64(Fnv1a64(bytes)); }
inline uint32_t BucketOf(std::string_view bytes) {
  return static_cast<uint32_t>(Hash64(bytes) % RoutingTable::kBuckets);
}

// Looks up one request attribute as canonical text. Called only for the key
// attribute and cohort attributes, while a snapshot read guard is held.
class AttributeSource {
 public:
  virtual ~AttributeSource() = default;
  // *found = false when absent; an error when the value has an unsupported type.
  virtual Status Get(const std::string& name, bool* found, std::string* canonical) const = 0;
};

// Attributes as a flat list of (name, canonical text) pairs (C++ callers, tests, benches).
class VectorAttributes final : public AttributeSource {
 public:
  std::vector<std::pair<std::string, std::string>> items;
  Status Get(const std::string& name, bool* found, std::string* canonical) const override;
};

struct RouteResult {
  int64_t version = -1;
  std::vector<int64_t> shadows;
  uint64_t generation = 0;
};

// Thread-safe. Readers (Route*, Snapshot, Models) are wait-free and never block
// on publishers; publishers serialise among themselves on write_mu_.
class Router {
 public:
  Router();
  Router(const Router&) = delete;
  Router& operator=(const Router&) = delete;

  // Validate and make `spec` the table of `model` (added if new). Refused with
  // kFailedPrecondition when spec.generation <= the model's current generation,
  // kInvalidArgument when the spec is invalid. The previous state stays live on error.
  Status Publish(const std::string& model, RoutingSpec spec);
  // Remove `model`; *removed says whether it existed. A later Publish re-adds it
  // with any generation.
  Status Remove(const std::string& model, bool* removed);

  // Route one request (see the top of this file). kNotFound for an unknown model.
  Status Route(const std::string& model, const AttributeSource& attrs, std::string_view request_id,
               RouteResult* out) const;
  // Route many canonical keys by weights only (no cohorts), one snapshot for all.
  Status RouteKeys(const std::string& model, const std::vector<std::string>& keys,
                   std::vector<int64_t>* out) const;
  // Copy of the model's current spec; false when the model is unknown.
  bool Snapshot(const std::string& model, RoutingSpec* out) const;
  std::vector<std::string> Models() const;

 private:
  std::mutex write_mu_;           // serialises Publish/Remove (read-check-swap of the state)
  SnapshotCell<RouterState> cell_;  // owns the current RouterState; readers Load() it
};

}  // namespace swapserve
