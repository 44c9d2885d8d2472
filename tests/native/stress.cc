// Standalone stress test of the native core (no Python). Built and run under
// ThreadSanitizer and AddressSanitizer/LeakSanitizer by run_sanitizers.sh.
//
//   stress [publishes=1000000] [batcher_requests=20000]
//
// Router: reader threads route continuously while one writer publishes
// `publishes` snapshots of model "m" and another adds/removes models. Every answer
// must be internally consistent with exactly one published generation, and
// generations seen by a reader never go backwards. At the end every retired
// snapshot must have been freed.
// Batcher: producers submit with random sizes/deadlines, two consumers drain; each
// ticket must come out exactly once (run or expired) with its exact bytes.
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "batcher.h"
#include "router.h"
#include "snapshot.h"

using namespace swapserve;

#define CHECK(cond)                                                          \
  do {                                                                       \
    if (!(cond)) {                                                           \
      std::fprintf(stderr, "CHECK failed %s:%d: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                          \
    }                                                                        \
  } while (0)

namespace {

constexpr int64_t kShadowBase = 1000000000000LL;

// Generation g publishes versions {2g, 2g+1} (50/50), shadow kShadowBase+g, and a
// cohort rule tier==gold -> 2g+1, so every answer encodes its generation.
RoutingSpec SpecFor(uint64_t g) {
  RoutingSpec s;
  s.generation = g;
  s.versions = {static_cast<int64_t>(2 * g), static_cast<int64_t>(2 * g + 1)};
  s.weights_bp = {5000, 5000};
  s.shadows = {kShadowBase + static_cast<int64_t>(g)};
  s.cohorts = {CohortRule{"tier", "gold", ValueKind::kString, static_cast<int64_t>(2 * g + 1)}};
  return s;
}

void StressRouter(uint64_t publishes) {
  Router router;
  CHECK(router.Publish("m", SpecFor(1)).ok());
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> reads{0};

  auto reader = [&](int id) {
    VectorAttributes plain, gold;
    plain.items.push_back({"routing_key", "user-" + std::to_string(id)});
    gold.items.push_back({"tier", "gold"});
    std::vector<std::string> keys = {"a", "b", "c", "d"};
    std::vector<int64_t> versions;
    RouteResult r;
    uint64_t last_gen = 0, n = 0;
    while (!stop.load(std::memory_order_relaxed)) {
      const bool use_gold = (n & 1) != 0;
      CHECK(router.Route("m", use_gold ? gold : plain, "", &r).ok());
      const uint64_t g = r.generation;
      CHECK(g >= last_gen);
      last_gen = g;
      CHECK(r.version / 2 == static_cast<int64_t>(g));
      if (use_gold) CHECK(r.version == static_cast<int64_t>(2 * g + 1));
      CHECK(r.shadows.size() == 1 && r.shadows[0] == kShadowBase + static_cast<int64_t>(g));
      if ((n & 63) == 0) {
        CHECK(router.RouteKeys("m", keys, &versions).ok());
        for (int64_t v : versions) CHECK(v / 2 >= static_cast<int64_t>(g));
        RouteResult x;
        Status st = router.Route("extra", plain, "rid", &x);  // comes and goes
        CHECK(st.ok() ? x.version == 7 : st.code() == StatusCode::kNotFound);
      }
      ++n;
    }
    reads.fetch_add(n);
  };

  std::vector<std::thread> readers;
  for (int i = 0; i < 2; ++i) readers.emplace_back(reader, i);
  std::thread churn([&] {  // add/remove another model while "m" is being republished
    RoutingSpec extra;
    extra.versions = {7};
    extra.weights_bp = {10000};
    while (!stop.load(std::memory_order_relaxed)) {
      CHECK(router.Publish("extra", extra).ok());
      bool removed = false;
      CHECK(router.Remove("extra", &removed).ok() && removed);
      std::this_thread::yield();
    }
  });

  for (uint64_t g = 2; g <= publishes + 1; ++g) CHECK(router.Publish("m", SpecFor(g)).ok());
  CHECK(router.Publish("m", SpecFor(3)).code() == StatusCode::kFailedPrecondition);  // stale
  stop = true;
  for (auto& t : readers) t.join();
  churn.join();
  RoutingSpec last;
  CHECK(router.Snapshot("m", &last) && last.generation == publishes + 1);
  std::printf("router: %llu publishes, %llu routes by 2 readers\n", static_cast<unsigned long long>(publishes),
              static_cast<unsigned long long>(reads.load()));
}

void StressBatcher(int total) {
  std::unique_ptr<Batcher> b;
  BatcherOptions o;
  o.max_batch_rows = 16;
  o.preferred_batch_rows = {4, 8};
  o.max_queue_delay_us = 100;
  o.max_queue_size = 0;
  CHECK(Batcher::Create(o, &b).ok());
  const int producers = 4;
  std::vector<std::atomic<int>> seen(total);
  std::atomic<int> done{0};

  auto produce = [&](int p) {
    std::mt19937 rng(p);
    for (int t = p; t < total; t += producers) {
      int64_t rows = 1 + t % 5;
      std::vector<uint8_t> a(rows * 8, static_cast<uint8_t>(t));
      std::vector<uint8_t> id(sizeof(int), 0);
      std::memcpy(id.data(), &t, sizeof(int));
      int64_t deadline = (rng() % 10 == 0) ? MonotonicNowNs() + static_cast<int64_t>(rng() % 200000) : 0;
      CHECK(b->Submit(t, rows, {{a.data(), a.size()}, {id.data(), id.size()}}, deadline).ok());
    }
  };
  auto consume = [&] {
    Batch batch;
    bool got = false;
    for (;;) {
      b->NextBatch(-1, &batch, &got);
      if (!got) return;
      int64_t rows = 0;
      size_t off = 0;
      for (size_t k = 0; k < batch.tickets.size(); ++k) {
        const int t = static_cast<int>(batch.tickets[k]);
        CHECK(batch.rows[k] == 1 + t % 5);
        for (int64_t i = 0; i < batch.rows[k] * 8; ++i) CHECK(batch.inputs[0][off + i] == static_cast<uint8_t>(t));
        off += batch.rows[k] * 8;
        int id;
        std::memcpy(&id, batch.inputs[1].get() + k * sizeof(int), sizeof(int));
        CHECK(id == t);
        CHECK(seen[t].fetch_add(1) == 0);
        rows += batch.rows[k];
      }
      CHECK(rows <= 16);
      for (int64_t t : batch.expired) CHECK(seen[t].fetch_add(1) == 0);
      done.fetch_add(static_cast<int>(batch.tickets.size() + batch.expired.size()));
    }
  };
  std::vector<std::thread> threads;
  for (int c = 0; c < 2; ++c) threads.emplace_back(consume);
  std::vector<std::thread> prods;
  for (int p = 0; p < producers; ++p) prods.emplace_back(produce, p);
  for (auto& t : prods) t.join();
  b->Close();
  for (auto& t : threads) t.join();
  CHECK(done.load() == total);
  for (int t = 0; t < total; ++t) CHECK(seen[t].load() == 1);
  CHECK(b->Submit(0, 1, {}, 0).code() == StatusCode::kUnavailable);
  BatcherStats s = b->Stats();
  std::printf("batcher: %d requests, %lld batches, %lld expired\n", total, static_cast<long long>(s.batches),
              static_cast<long long>(s.expired));
}

}  // namespace

int main(int argc, char** argv) {
  const uint64_t publishes = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 1000000;
  const int requests = argc > 2 ? std::atoi(argv[2]) : 20000;
  CHECK(EpochDomain::AtomicsAreLockFree());
  StressRouter(publishes);
  StressBatcher(requests);
  CHECK(EpochDomain::Global().Collect() == 0);  // every retired snapshot was freed
  std::printf("ok\n");
  return 0;
}
