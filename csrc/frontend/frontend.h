// Frontend: the inference port's HTTP/2 and gRPC framing in C++ (grpc++), request handling in
// Python (swapserve.server.native_frontend, through swapserve.native).
//
// Python's grpc.aio spends a few hundred microseconds of CPU per call in its own machinery
// before a servicer sees the request; on a 2-core machine that, not the model, bounds
// throughput. This front end serves the port with grpc++'s async *generic* API instead: the
// completion queue accepts calls, reads their messages and writes their answers; Python only
// sees events and answers them.
//
//   completion queue                      Python event loop
//   ----------------                      -----------------
//   call arrives, message read  --push--> queue; eventfd written when the queue was empty
//                                         loop reader: Drain() -> [Event]
//                                         handler runs (the same servicers as grpc.aio)
//   Write / WriteAndFinish / Finish <---- Write(id, bytes), Finish(id, code, details, last)
//
// TWO MODES
//   threaded: Start(polled=false) runs the completion queue on a thread of its own and wakes
//     the event loop through the eventfd (fd()).
//   polled (what `swapserve serve` runs): no completion-queue thread. The event loop's selector
//     calls Poll, which runs the queue on the loop's own thread and returns when an event waits
//     for Drain, when the loop's own descriptors become ready (a watcher thread blocks on the
//     loop's epoll fd, given to Watch, and ends Poll with an alarm), or at the loop's next
//     timer. A request that arrives alone is then read, run and answered without waking a
//     second thread: on a small machine those wake-ups cost more CPU than the request itself.
//
// EVENTS AND ANSWERS (guarantees Python relies on)
//   * Every call gets a kMessage event for its first request message. Further messages are read
//     only when Python asks (Read, once per message it has room for): each Read is answered by
//     a kMessage, or by kHalfClose when the client is done sending. Until then grpc++ reads no
//     more of the call, so a client that sends faster than the server works is held back by
//     HTTP/2 flow control instead of filling memory (unary calls are never read again).
//   * Write queues a message behind the one in flight. It answers kFull when the call then holds
//     kMaxQueuedWrites messages or kMaxQueuedWriteBytes bytes grpc has not taken (a client that
//     does not read its responses); Python writes no more to that call until kWritable, pushed
//     once the queue has drained to half of both. A call's queued answer is thus bounded by
//     about kMaxQueuedWriteBytes plus one message.
//   * A call Python was told about gets kCancelled when the client went away or the deadline
//     passed, unless Python already finished it.
//   * Python finishes every call it was told about exactly once; calls cancelled before Python
//     saw them are finished here. An error status drops the writes still queued.
//   * grpc++ allows one outstanding read and one outstanding write per call: reads wait for
//     Python, writes queue per call and the finish waits for them to drain.
//
// LOCK ORDER (a thread holding a lock takes only locks to its right):
//
//   stop_mu_ -> ops_mu_ -> calls_mu_ -> Call::mu -> events_mu_
//                     \-> listen_mu_ (taken alone under ops_mu_ or stop_mu_, nothing inside it)
//
//   Python's Write/Read/Finish (Find) and the completion of a new call (OnRequest) both take
//   calls_mu_ before the call's mutex; nothing takes calls_mu_ while holding a Call::mu.
//   Release erases under calls_mu_, then takes Call::mu alone to let a Find that won the race
//   finish. The GIL is outside this order: no thread of the front end ever takes it, so Python
//   may hold it while it waits for any of these (Drain and Poll(0) do).
//
// ERRORS are Status values (../status.h): Create, Start and Watch report them; Write (kGone), Read
// and Finish (false) answer so when the call is gone (the client left, or it was finished): that is
// not an error, Python simply drops its answer.
#pragma once

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "../core/status.h"

namespace swapserve {
namespace frontend {

struct Call;             // call.h
enum class Op : uint8_t;  // call.h

enum class EventKind : int { kMessage = 0, kHalfClose = 1, kCancelled = 2, kWritable = 3 };

// What Write did with a message: kGone (dropped: the call is gone or finished), kQueued, or
// kFull (queued, and the call now holds as much as it may: wait for kWritable before the next).
enum class WriteResult : int { kGone = 0, kQueued = 1, kFull = 2 };

// What Drain reports: one thing that happened to one call.
struct Event {
  uint64_t call = 0;
  EventKind kind = EventKind::kMessage;
  std::string method;       // on every event, so Python needs no per-call table for dispatch
  std::string payload;      // kMessage only: the serialized request message
  int64_t deadline_ns = 0;  // CLOCK_MONOTONIC ns (Python's time.monotonic_ns()); 0 = none
};

// What Poll found: kPending when events wait for Drain, kIdle when not, kOff when the queue is
// shut down or the front end is not polled (the caller then waits on its descriptors alone).
enum class PollResult : int { kOff = 0, kIdle = 1, kPending = 2 };

// TLS for the port: PEM files grpc++ watches (FileWatcherCertificateProvider), so a new
// handshake uses what the files hold at most kTlsRefreshS seconds after they change and an
// open connection keeps the certificate it was made with. Empty key_path: plaintext. With a
// ca_path, clients must present a certificate that CA issued (mTLS). Python points these at
// private copies it rewrites on SIGHUP (swapserve.tls), never at the operator's own files.
struct TlsFiles {
  std::string key_path;
  std::string cert_path;
  std::string ca_path;
};

// Thread-safety: Poll, Watch and Drain are called by the event loop's thread only; Write,
// Read and Finish by any thread; Stop by any one thread (it may block for the grace period).
class Frontend {
 public:
  // Creates the descriptors the front end needs for its whole life (the eventfd behind fd(),
  // the watcher's epoll set and its stop eventfd); serving starts with Start. Errors:
  // kResourceExhausted (out of descriptors or memory; the message names the limit to raise),
  // kInternal (any other failure of the system call).
  static Status Create(std::string address, int max_message_bytes, std::unique_ptr<Frontend>* out,
                       TlsFiles tls = {});
  // Stops (no grace), joins every thread, deletes the calls Stop left and closes the descriptors.
  ~Frontend();
  Frontend(const Frontend&) = delete;
  Frontend& operator=(const Frontend&) = delete;

  // Bind and start serving; *port is the bound port. ``polled``: no completion-queue thread,
  // the event loop's thread runs the queue in Poll. Errors: kUnavailable (the address could not
  // be bound), kFailedPrecondition (called before), kResourceExhausted (no thread).
  Status Start(bool polled, int* port);

  // Polled mode: runs every ready completion; with ``timeout_s`` != 0 then waits, up to
  // ``timeout_s`` (< 0: no limit), until an event for Python was queued, the descriptors given
  // to Watch became ready, or the time passed. Never blocks when ``timeout_s`` == 0.
  PollResult Poll(double timeout_s);

  // Polled mode: watch the event loop's own descriptor set (an epoll fd) from a small thread
  // that only ends a blocking Poll when it becomes readable (timers are Poll's timeout).
  // Errors: kFailedPrecondition (not polled, or already watching), kInternal (epoll_ctl),
  // kResourceExhausted (no thread).
  Status Watch(int fd);

  // Readable when Drain has events (threaded mode, and polled mode once shut down).
  int fd() const { return efd_; }

  // Everything that happened since the last Drain, oldest first. Never waits for Python: the
  // completion queue takes events_mu_ only to push.
  std::vector<Event> Drain();

  // The peer address ("ipv4:127.0.0.1:5555") and the client's metadata of a call Python was
  // told about (binary "-bin" headers left out). Read on demand, so calls that never ask (the
  // inference path) pay nothing. False when the call is gone.
  bool CallInfo(uint64_t id, std::string* peer, std::vector<std::pair<std::string, std::string>>* metadata);

  // The TLS identity of a call's connection: (property, value) pairs for the client
  // certificate's common name and subject alternative names, and the transport security type
  // (empty without TLS). Read on demand, like CallInfo. False when the call is gone.
  bool AuthInfo(uint64_t id, std::vector<std::pair<std::string, std::string>>* properties);

  // Queue one response message (streaming responses): kGone when the call is gone or finished,
  // kFull when Python must wait for kWritable before writing the next (see EVENTS AND ANSWERS).
  WriteResult Write(uint64_t id, std::string data);
  // A client-streaming call: read its next message (kMessage) or half-close (kHalfClose). False,
  // and nothing read, when the call is gone or finishing, a read is outstanding, or the
  // half-close was already reported.
  bool Read(uint64_t id);
  // End the call with ``code`` (a grpc::StatusCode) and ``details``; ``last``, when given, is
  // sent as the final message with it (dropped for an error status). False when the call is
  // gone or was already finished.
  bool Finish(uint64_t id, int code, std::string details, std::optional<std::string> last);

  // Stop accepting calls, give in-flight ones ``grace_s`` to finish, then cancel them. Called
  // without the GIL while the event loop keeps answering the in-flight calls. Idempotent.
  void Stop(double grace_s);

 private:
  static constexpr int kListening = 16;  // calls always waiting for the next client
  static constexpr unsigned kTlsRefreshS = 1;  // how often grpc++ looks at the TLS files
  // A call's answer grpc has not taken yet, at most (beyond it Write answers kFull). Enough to keep
  // a reading client's stream busy between two turns of the event loop; a client that does not
  // read holds at most this (and one message) here.
  static constexpr size_t kMaxQueuedWrites = 64;
  static constexpr size_t kMaxQueuedWriteBytes = size_t{1} << 20;

  Frontend(std::string address, int max_message_bytes, int efd, int watch_epoll, int watch_stop, TlsFiles tls);
  std::shared_ptr<grpc::ServerCredentials> Credentials() const;

  void Listen();
  Call* Find(uint64_t id, std::unique_lock<std::mutex>* held);
  void Push(Event e);
  PollResult Pending();
  PollResult ShutDown();
  void PumpLocked(Call* c);
  void Release(Call* c);
  void Loop();
  bool Arm(int op, int fd);
  void WatchLoop();
  void Kick();
  bool Handle(void* raw, bool ok);
  void OnRequest(Call* c, bool ok);
  void OnCompletion(Call* c, Op op, bool ok);

  // -- immutable after Create / Start --
  const std::string address_;
  const int max_message_bytes_;
  const TlsFiles tls_;     // empty key_path: plaintext
  const int efd_;          // owned eventfd: Drain's wake-up; closed in the destructor
  const int watch_epoll_;  // owned epoll set of the watcher (watch_stop_ + the loop's fd); closed in the destructor
  const int watch_stop_;   // owned eventfd that ends the watcher; closed in the destructor
  bool polled_ = false;        // set by Start before any thread starts
  bool start_called_ = false;  // Start runs once (the generic service registers with one server)

  // -- grpc++ objects (declared so that server_ is destroyed before cq_, cq_ before service_) --
  grpc::AsyncGenericService service_;
  std::unique_ptr<grpc::ServerCompletionQueue> cq_;  // owned; shut down in Stop, drained before it is destroyed
  std::unique_ptr<grpc::Server> server_;             // owned; null until Start succeeds

  // -- threads (both joined in Stop) --
  std::thread thread_;   // threaded mode: runs Loop() until the queue is shut down and drained
  std::thread watcher_;  // polled mode after Watch: WatchLoop() until watch_stop_ is written
  int watched_ = -1;     // the loop's epoll fd (not owned); set by Watch on the loop's thread

  std::atomic<uint64_t> pushed_{0};          // events pushed so far: Poll returns when it moves
  std::atomic<bool> kick_pending_{false};    // a Wake is in the queue (at most one at a time)
  std::atomic<uint64_t> next_id_{1};         // id of the next Call

  std::mutex calls_mu_;                      // guards calls_
  std::unordered_map<uint64_t, Call*> calls_;  // owns every call that arrived until Release; the destructor deletes the rest
  std::mutex events_mu_;                     // guards events_
  std::vector<Event> events_;                // owned events waiting for Drain
  std::mutex stop_mu_;                       // serialises Stop
  bool stopped_ = false;                     // guarded by stop_mu_
  std::mutex listen_mu_;                     // guards shutting_down_: no RequestCall may follow the shutdown
  bool shutting_down_ = false;
  std::shared_mutex ops_mu_;                 // shared: starting an operation on the queue; exclusive: shutting it down
  bool closed_ = false;                      // guarded by ops_mu_: the queue refuses new operations
};

}  // namespace frontend
}  // namespace swapserve
