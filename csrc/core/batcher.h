// Batcher: one dynamic-batching queue per serving version.
//
// Many producers Submit() requests (their input bytes are copied in); one or more
// consumers (runtime workers) call NextBatch(), which blocks until a batch is due
// and returns it with each input gathered into one contiguous buffer.
//
// BATCH FORMATION (requests are taken in FIFO order, never reordered):
//   Let the candidate be the longest queue prefix whose rows fit in max_batch_rows.
//   A batch is due when any of these holds:
//     * max_batch_rows == 0: every request is its own batch, due at once;
//     * full: the queued rows reach max_batch_rows (or the next request does not fit);
//     * preferred: a prefix sums exactly to a preferred size P and either P is the
//       largest preferred size or another request is queued behind it (taking it
//       would overshoot P);
//     * delay: the oldest request has waited max_queue_delay_us (0: at once);
//     * closed: the queue is draining.
//   The batch taken is the longest prefix summing to a preferred size if there is
//   one (the largest such), else the whole candidate.
//   Requests whose deadline passed while queued are removed and reported in
//   Batch::expired, never in Batch::tickets.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "clock.h"
#include "status.h"

namespace swapserve {

struct BatcherOptions {
  int64_t max_batch_rows = 0;               // 0: no batching
  std::vector<int64_t> preferred_batch_rows;  // each in [1, max_batch_rows]
  int64_t max_queue_delay_us = 0;           // 0: dispatch whatever is queued at once
  int64_t max_queue_size = 0;               // max queued requests; 0: unbounded
  int64_t max_queue_bytes = 0;              // max input bytes of the queued requests together; 0: unbounded
  std::string name;                         // e.g. "model 'm' version 3", used in messages
};

struct InputView {
  const uint8_t* data;  // borrowed for the duration of Submit
  size_t size;
};

// One dispatched batch. Owns the gathered input buffers until handed off.
struct Batch {
  std::vector<int64_t> tickets;                   // requests to run, FIFO order
  std::vector<int64_t> rows;                      // rows of each ticket
  std::vector<int64_t> queue_ns;                  // time each ticket waited in the queue
  std::vector<int64_t> expired;                   // deadline passed while queued; not run
  std::vector<std::unique_ptr<uint8_t[]>> inputs;  // owned: input i of all tickets, concatenated
  std::vector<size_t> input_sizes;                // byte size of inputs[i]
};

struct BatcherStats {
  int64_t submitted = 0;        // requests accepted
  int64_t rejected_full = 0;    // Submit refused because the queue was full (max_queue_size)
  int64_t rejected_bytes = 0;   // Submit refused because its bytes would pass max_queue_bytes
  int64_t expired = 0;          // requests reported in Batch::expired
  int64_t batches = 0;          // batches with at least one ticket
  std::map<int64_t, int64_t> rows_histogram;  // batch rows -> number of batches
};

// Thread-safe: any number of producers and consumers.
class Batcher {
 public:
  // Validates the options (error: kInvalidArgument).
  static Status Create(BatcherOptions options, std::unique_ptr<Batcher>* out);
  // Closes. The owner must ensure no thread is still inside Submit/NextBatch.
  ~Batcher();
  Batcher(const Batcher&) = delete;
  Batcher& operator=(const Batcher&) = delete;

  // Copy the request's inputs into the queue. Errors: kInvalidArgument (rows out
  // of range, input count differs from earlier requests), kResourceExhausted
  // (max_queue_size requests queued, or the queued input bytes with this request's
  // would pass max_queue_bytes: a request larger than the bound is never queued),
  // kUnavailable (closed).
  // deadline_ns: absolute MonotonicNowNs() value, 0 = none.
  Status Submit(int64_t ticket, int64_t rows, const std::vector<InputView>& inputs, int64_t deadline_ns);

  // Wait up to timeout_us (< 0: forever) for a due batch. *got = false on timeout,
  // or when closed and drained. When *got, the batch has at least one ticket or at
  // least one expired ticket.
  void NextBatch(int64_t timeout_us, Batch* out, bool* got);

  // Refuse further submits and wake every consumer; queued requests still drain.
  void Close();
  size_t Pending();
  BatcherStats Stats();
  const BatcherOptions& options() const { return options_; }

 private:
  struct Request {
    int64_t ticket;
    int64_t rows;
    int64_t enqueue_ns;
    int64_t deadline_ns;
    std::unique_ptr<uint8_t[]> data;  // owned: all inputs back to back
    std::vector<size_t> sizes;        // byte size of each input inside data
    int64_t bytes;                    // sum of sizes: what it counts against max_queue_bytes
  };

  explicit Batcher(BatcherOptions options);
  // Under mu_: move expired requests into out->expired; returns the earliest
  // remaining deadline (INT64_MAX if none).
  int64_t TakeExpired(int64_t now, Batch* out);
  // Under mu_: how many front requests to take, whether due now, and when due otherwise.
  size_t Plan(int64_t now, bool* due, int64_t* due_at) const;
  bool IsPreferred(int64_t rows) const;
  Status BytesExhausted(const std::string& who, int64_t bytes, int64_t queued) const;

  const BatcherOptions options_;   // immutable after Create
  int64_t largest_preferred_ = 0;  // max of preferred_batch_rows (0 if none)
  std::mutex mu_;                  // guards everything below; never held while taking the GIL
  std::condition_variable cv_;     // consumers wait here; signalled by Submit and Close
  std::deque<Request> queue_;      // owned queued requests, FIFO
  int64_t queued_bytes_ = 0;       // sum of Request::bytes over queue_
  int64_t n_inputs_ = -1;          // inputs per request, fixed by the first accepted request
  bool closed_ = false;
  BatcherStats stats_;
};

}  // namespace swapserve
