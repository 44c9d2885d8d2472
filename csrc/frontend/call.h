// Call: one gRPC call of the generic service, from the listener that waits for a client to the
// last completion of its operations. Private to the front end (frontend.cc); Python knows a call
// only by its id.
//
// STATE (Call::state, guarded by Call::mu; it only moves forward):
//
//   kListening --RequestCall ok--> kArrived --first read reported--> kDelivered
//        |                            |                                 |
//        | (shut down before a        | cancelled before Python         | Python: Finish
//        |  client came: deleted)     | saw it: finished here           v
//        |                            +-----------------------> kFinishPending  (writes still queued)
//        |                                                          | the last write went
//        |                                                          v
//        |                                                      kFinishing     (Finish / WriteAndFinish issued)
//        |                                                          | its completion
//        v                                                          v
//     deleted once no completion is outstanding        <------- kFinished
//
// Independent of the state: which completions are still to come (Call::outstanding, at most one
// read and one write at a time, as grpc++ allows, plus the done notification), whether the
// client's half-close was reported (Call::half_closed: no read follows it), and how much of the
// call's answer grpc has not taken yet (Call::queued_write_bytes, Call::write_blocked).
#pragma once

#include <grpcpp/alarm.h>
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>

#include <cstddef>
#include <cstdint>
#include <deque>
#include <mutex>
#include <string>

namespace swapserve {
namespace frontend {

struct Call;

// What a completion-queue tag refers to: one operation of one call, or a wake-up.
enum class Op : uint8_t { kRequest, kRead, kWrite, kFinish, kDone, kWake };

struct Tag {
  Call* call;  // not owned; null for kWake
  Op op;
};

// Ends a blocking Poll early: set to fire at once when the event loop's own descriptors are
// ready. Owned by the completion queue while set; deleted by whoever dequeues it.
struct Wake : Tag {
  Wake() : Tag{nullptr, Op::kWake} {}
  grpc::Alarm alarm;
};

enum class CallState : uint8_t {
  kListening,      // RequestCall issued; no client yet
  kArrived,        // a client's call, not yet reported to Python
  kDelivered,      // Python has been told about it and will Finish it exactly once
  kFinishPending,  // Finish requested (by Python, or here for a call Python never saw); writes queued before it
  kFinishing,      // stream.Finish or WriteAndFinish issued
  kFinished,       // that operation completed
};

// Bits of Call::outstanding: operations whose completion is still to come.
enum : uint8_t {
  kReadOutstanding = 1,   // stream.Read issued
  kWriteOutstanding = 2,  // stream.Write issued
  kDoneOutstanding = 4,   // AsyncNotifyWhenDone armed, not yet fired
};

// Owned by Frontend from Listen() until Release() deletes it (see Frontend::calls_).
struct Call {
  explicit Call(uint64_t id_) : id(id_), stream(&ctx) {}
  Call(const Call&) = delete;
  Call& operator=(const Call&) = delete;

  const uint64_t id;                        // unique for the front end's life; Python's handle
  grpc::GenericServerContext ctx;           // grpc++ per-call state; must outlive every operation of the call
  grpc::GenericServerAsyncReaderWriter stream;
  Tag request_tag{this, Op::kRequest}, read_tag{this, Op::kRead}, write_tag{this, Op::kWrite},
      finish_tag{this, Op::kFinish}, done_tag{this, Op::kDone};

  // Guards everything below. The completion-queue thread completes operations while the Python
  // thread writes and finishes; taken after Frontend::calls_mu_, before Frontend::events_mu_.
  std::mutex mu;
  CallState state = CallState::kListening;
  uint8_t outstanding = kDoneOutstanding;   // k*Outstanding bits
  bool half_closed = false;                 // kHalfClose was pushed: Frontend::Read refuses further reads
  grpc::ByteBuffer read_buf;                // target of the outstanding read
  std::deque<grpc::ByteBuffer> writes;      // owned messages waiting behind the write in flight
  size_t writing_bytes = 0;                 // bytes of the write in flight (kWriteOutstanding), else 0
  size_t queued_write_bytes = 0;            // bytes of writes + writing_bytes: what grpc has not taken yet
  bool write_blocked = false;               // Write answered kFull: kWritable is pushed once the queue drained
  grpc::Status final_status;                // set with kFinishPending
  int64_t deadline_ns = 0;                  // CLOCK_MONOTONIC ns; 0 = none. Set on arrival
  std::string method;                       // set on arrival

  bool finish_requested() const { return state >= CallState::kFinishPending; }
  // Drop the messages waiting behind the write in flight (the client is gone, or an error ends the call).
  void ClearWrites() {
    writes.clear();
    queued_write_bytes = writing_bytes;
  }
  // No completion of this call can arrive any more: it may be deleted.
  bool releasable() const {
    return outstanding == 0 && (state == CallState::kFinished || state == CallState::kListening);
  }
};

}  // namespace frontend
}  // namespace swapserve
