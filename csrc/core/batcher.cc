#include "batcher.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <limits>

namespace swapserve {

namespace {
constexpr int64_t kNever = std::numeric_limits<int64_t>::max();

// steady_clock is CLOCK_MONOTONIC on Linux (libstdc++), so the two time lines agree.
std::chrono::steady_clock::time_point ToSteady(int64_t ns) {
  return std::chrono::steady_clock::time_point(std::chrono::nanoseconds(ns));
}
}  // namespace

// The refusal of a request whose bytes would pass max_queue_bytes: what is queued, what it
// asked for, and both ways out.
Status Batcher::BytesExhausted(const std::string& who, int64_t bytes, int64_t queued) const {
  return Status::ResourceExhausted("queue of " + who + " holds " + std::to_string(queued) + " bytes of requests; this " +
                                   std::to_string(bytes) + "-byte request would pass its bound of " +
                                   std::to_string(options_.max_queue_bytes) +
                                   " bytes (max_queue_bytes); retry later, or raise the bound: swapserve serve "
                                   "--max-queue-bytes for every model, or the model's config parameter "
                                   "swapserve.max_queue_bytes");
}

Status Batcher::Create(BatcherOptions o, std::unique_ptr<Batcher>* out) {
  std::string who = o.name.empty() ? "batcher" : "batcher of " + o.name;
  if (o.max_batch_rows < 0) return Status::InvalidArgument(who + ": max_batch_rows must be >= 0 (0 disables batching)");
  if (o.max_queue_delay_us < 0) return Status::InvalidArgument(who + ": max_queue_delay_us must be >= 0");
  if (o.max_queue_size < 0) return Status::InvalidArgument(who + ": max_queue_size must be >= 0 (0 = unbounded)");
  if (o.max_queue_bytes < 0) return Status::InvalidArgument(who + ": max_queue_bytes must be >= 0 (0 = unbounded)");
  for (int64_t p : o.preferred_batch_rows) {
    if (o.max_batch_rows == 0)
      return Status::InvalidArgument(who + ": preferred_batch_rows need max_batch_rows > 0");
    if (p < 1 || p > o.max_batch_rows)
      return Status::InvalidArgument(who + ": preferred batch size " + std::to_string(p) + " is outside [1, " +
                                     std::to_string(o.max_batch_rows) + "]");
  }
  out->reset(new Batcher(std::move(o)));
  return Status::Ok();
}

Batcher::Batcher(BatcherOptions options) : options_(std::move(options)) {
  for (int64_t p : options_.preferred_batch_rows) largest_preferred_ = std::max(largest_preferred_, p);
}

Batcher::~Batcher() { Close(); }

Status Batcher::Submit(int64_t ticket, int64_t rows, const std::vector<InputView>& inputs, int64_t deadline_ns) {
  const std::string& who = options_.name.empty() ? std::string("this version") : options_.name;
  if (rows < 1) return Status::InvalidArgument("request for " + who + " has " + std::to_string(rows) + " rows; need >= 1");
  if (options_.max_batch_rows > 0 && rows > options_.max_batch_rows)
    return Status::InvalidArgument("request for " + who + " has batch dimension " + std::to_string(rows) +
                                   " > max_batch_size " + std::to_string(options_.max_batch_rows) +
                                   "; split it into smaller requests");
  // Copy outside the lock: producers only contend for the enqueue itself.
  Request r{ticket, rows, 0, deadline_ns, nullptr, {}, 0};
  size_t total = 0;
  r.sizes.reserve(inputs.size());
  for (const InputView& in : inputs) {
    r.sizes.push_back(in.size);
    total += in.size;
  }
  r.bytes = static_cast<int64_t>(total);
  // Refused before the copy: the bound exists so that memory is not spent on what it refuses.
  if (options_.max_queue_bytes > 0 && r.bytes > options_.max_queue_bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.rejected_bytes;
    return BytesExhausted(who, r.bytes, 0);
  }
  r.data.reset(new uint8_t[total == 0 ? 1 : total]);
  size_t off = 0;
  for (const InputView& in : inputs) {
    if (in.size) std::memcpy(r.data.get() + off, in.data, in.size);
    off += in.size;
  }

  std::lock_guard<std::mutex> lock(mu_);
  if (closed_)
    return Status::Unavailable(who + " is not accepting requests (its batcher is closed: draining or unloaded); "
                               "retry so the router picks a serving version");
  if (options_.max_queue_size > 0 && static_cast<int64_t>(queue_.size()) >= options_.max_queue_size) {
    ++stats_.rejected_full;
    return Status::ResourceExhausted("queue of " + who + " is full (" + std::to_string(options_.max_queue_size) +
                                     " requests); retry later or raise max_queue_size");
  }
  if (options_.max_queue_bytes > 0 && queued_bytes_ + r.bytes > options_.max_queue_bytes) {
    ++stats_.rejected_bytes;
    return BytesExhausted(who, r.bytes, queued_bytes_);
  }
  if (n_inputs_ >= 0 && static_cast<int64_t>(inputs.size()) != n_inputs_)
    return Status::InvalidArgument("request for " + who + " has " + std::to_string(inputs.size()) +
                                   " inputs but earlier requests had " + std::to_string(n_inputs_) +
                                   "; send every input the model declares");
  n_inputs_ = static_cast<int64_t>(inputs.size());
  r.enqueue_ns = MonotonicNowNs();
  queued_bytes_ += r.bytes;
  queue_.push_back(std::move(r));
  ++stats_.submitted;
  cv_.notify_one();
  return Status::Ok();
}

bool Batcher::IsPreferred(int64_t rows) const {
  const auto& p = options_.preferred_batch_rows;
  return std::find(p.begin(), p.end(), rows) != p.end();
}

int64_t Batcher::TakeExpired(int64_t now, Batch* out) {
  int64_t earliest = kNever;
  for (auto it = queue_.begin(); it != queue_.end();) {
    if (it->deadline_ns != 0 && it->deadline_ns <= now) {
      out->expired.push_back(it->ticket);
      ++stats_.expired;
      queued_bytes_ -= it->bytes;
      it = queue_.erase(it);
    } else {
      if (it->deadline_ns != 0) earliest = std::min(earliest, it->deadline_ns);
      ++it;
    }
  }
  return earliest;
}

size_t Batcher::Plan(int64_t now, bool* due, int64_t* due_at) const {
  if (options_.max_batch_rows == 0) {
    *due = true;
    return 1;
  }
  const int64_t max_rows = options_.max_batch_rows;
  int64_t sum = 0;
  size_t fit = 0, pref_take = 0;
  int64_t pref_rows = 0;
  for (const Request& r : queue_) {
    if (sum + r.rows > max_rows) break;
    sum += r.rows;
    ++fit;
    if (IsPreferred(sum)) {
      pref_take = fit;
      pref_rows = sum;
    }
  }
  const bool full = fit < queue_.size() || sum == max_rows;
  const bool preferred = pref_take > 0 && (pref_rows == largest_preferred_ || pref_take < queue_.size());
  const int64_t delay_due = queue_.front().enqueue_ns + options_.max_queue_delay_us * 1000;
  *due = full || preferred || closed_ || now >= delay_due;
  *due_at = delay_due;
  return pref_take > 0 ? pref_take : fit;
}

void Batcher::NextBatch(int64_t timeout_us, Batch* out, bool* got) {
  *out = Batch();
  *got = false;
  // Negative or absurdly long (> ~11 days) timeouts wait forever (and cannot overflow).
  const int64_t give_up =
      (timeout_us < 0 || timeout_us > 1000000000000LL) ? kNever : MonotonicNowNs() + timeout_us * 1000;
  std::vector<Request> taken;
  {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      const int64_t now = MonotonicNowNs();
      int64_t wake = std::min(give_up, TakeExpired(now, out));
      if (!queue_.empty()) {
        bool due = false;
        int64_t due_at = kNever;
        size_t take = Plan(now, &due, &due_at);
        if (due) {
          taken.reserve(take);
          for (size_t i = 0; i < take; ++i) {
            queued_bytes_ -= queue_.front().bytes;
            taken.push_back(std::move(queue_.front()));
            queue_.pop_front();
          }
          if (!queue_.empty()) cv_.notify_one();  // let another consumer look at the rest
          break;
        }
        wake = std::min(wake, due_at);
      } else if (closed_) {
        break;
      }
      if (!out->expired.empty() || now >= give_up) break;
      if (wake == kNever)
        cv_.wait(lock);
      else
        cv_.wait_until(lock, ToSteady(wake));
    }
    if (!taken.empty()) {
      int64_t rows = 0;
      for (const Request& r : taken) rows += r.rows;
      ++stats_.batches;
      ++stats_.rows_histogram[rows];
    }
  }
  *got = !taken.empty() || !out->expired.empty();
  if (taken.empty()) return;

  // Gather without the lock (and, from Python, without the GIL).
  const int64_t now = MonotonicNowNs();
  const size_t n_inputs = taken.front().sizes.size();
  out->tickets.reserve(taken.size());
  for (const Request& r : taken) {
    out->tickets.push_back(r.ticket);
    out->rows.push_back(r.rows);
    out->queue_ns.push_back(now - r.enqueue_ns);
  }
  std::vector<size_t> offsets(taken.size(), 0);
  for (size_t i = 0; i < n_inputs; ++i) {
    size_t total = 0;
    for (const Request& r : taken) total += r.sizes[i];
    std::unique_ptr<uint8_t[]> buf(new uint8_t[total == 0 ? 1 : total]);
    size_t pos = 0;
    for (size_t k = 0; k < taken.size(); ++k) {
      const size_t n = taken[k].sizes[i];
      if (n) std::memcpy(buf.get() + pos, taken[k].data.get() + offsets[k], n);
      offsets[k] += n;
      pos += n;
    }
    out->inputs.push_back(std::move(buf));
    out->input_sizes.push_back(total);
  }
}

void Batcher::Close() {
  std::lock_guard<std::mutex> lock(mu_);
  closed_ = true;
  cv_.notify_all();
}

size_t Batcher::Pending() {
  std::lock_guard<std::mutex> lock(mu_);
  return queue_.size();
}

BatcherStats Batcher::Stats() {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

}  // namespace swapserve
