// Native gRPC front end: HTTP/2 and gRPC framing in C++ (grpc++), request handling in Python.
//
// Python's grpc.aio spends a few hundred microseconds of CPU per call in its own machinery
// before a servicer sees the request; on a 2-core machine that, not the model, bounds
// throughput. This module serves the inference port with grpc++'s async *generic* API
// instead: one completion-queue thread accepts calls, reads their messages and writes
// their answers; Python only sees events and answers them.
//
//   C++ CQ thread                         Python event loop (swapserve.server.native_frontend)
//   -------------                         ----------------------------------------------------
//   call arrives, message read  --push--> queue; eventfd written when the queue was empty
//                                         loop reader: Drain() -> (id, kind, method, bytes, deadline)
//                                         handler runs (the same servicers as grpc.aio)
//   Write / WriteAndFinish / Finish <---- Write(id, bytes), Finish(id, code, details, last)
//
// That is the threaded mode. In polled mode (what `swapserve serve` runs) there is no CQ thread:
// the event loop's selector calls Poll, which runs the completion queue on the loop's own thread
// and returns when an event waits for Drain (no eventfd then), when the loop's descriptors become
// ready (a watcher thread blocks on the loop's epoll fd and wakes Poll with an alarm), or at the
// loop's next timer. A request that arrives alone is then read, run and answered without waking
// a second thread: on a small machine those wake-ups cost more CPU than the request itself.
//
// Every call gets a kMessage event for its first request message; a call Python marks as client
// streaming (Stream) gets one per further message and kHalfClose when the client is done sending
// (unary calls are not read again: one completion-queue round trip less per request). Any call
// gets kCancelled when the client went away or the deadline passed. Python
// finishes every call it was told about exactly once; calls cancelled before Python saw them
// are finished here. grpc++ allows one outstanding read and one outstanding write per call:
// reads are chained here, writes queue per call and the finish waits for them to drain.
//
// No exceptions cross into Python: errors are return values (see bindings at the end).
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <grpcpp/alarm.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

namespace py = pybind11;

namespace swapserve {
namespace frontend {

enum EventKind : int { kMessage = 0, kHalfClose = 1, kCancelled = 2 };

struct Event {
  uint64_t call = 0;
  int kind = kMessage;
  std::string method;   // on every event, so Python needs no per-call table for dispatch
  std::string payload;  // kMessage only
  int64_t deadline_ns = 0;  // CLOCK_MONOTONIC ns; 0 = none
};

int64_t MonotonicNs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000LL + ts.tv_nsec;
}

// Flatten a ByteBuffer (possibly several slices) into one string.
std::string ToString(const grpc::ByteBuffer& buf) {
  std::vector<grpc::Slice> slices;
  std::string out;
  if (!buf.Dump(&slices).ok()) return out;
  size_t total = 0;
  for (const auto& s : slices) total += s.size();
  out.reserve(total);
  for (const auto& s : slices) out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return out;
}

grpc::ByteBuffer ToBuffer(std::string data) {
  // The slice takes ownership of the string's bytes: no second copy.
  auto* owned = new std::string(std::move(data));
  grpc::Slice slice(owned->data(), owned->size(), [](void* p) { delete static_cast<std::string*>(p); }, owned);
  return grpc::ByteBuffer(&slice, 1);
}

class Frontend;

// What a completion-queue tag refers to: one operation of one call.
enum class Op { kRequest, kRead, kWrite, kFinish, kDone, kWake };

struct Call;

struct Tag {
  Call* call;
  Op op;
};

// Ends a blocking Poll early: set to fire at once when the event loop's own descriptors are ready.
struct Wake : Tag {
  Wake() : Tag{nullptr, Op::kWake} {}
  grpc::Alarm alarm;
};

struct Call {
  explicit Call(uint64_t id_) : id(id_), stream(&ctx) {}
  uint64_t id;
  grpc::GenericServerContext ctx;
  grpc::GenericServerAsyncReaderWriter stream;
  grpc::ByteBuffer read_buf;
  Tag request_tag{this, Op::kRequest}, read_tag{this, Op::kRead}, write_tag{this, Op::kWrite},
      finish_tag{this, Op::kFinish}, done_tag{this, Op::kDone};

  // Guarded by mu: the Python thread writes and finishes while the CQ thread completes ops.
  std::mutex mu;
  std::deque<grpc::ByteBuffer> writes;   // waiting behind the one in flight
  bool write_in_flight = false;
  bool read_in_flight = false;
  bool started = false;                  // the call arrived (RequestCall completed)
  bool delivered = false;                // Python has been told about it
  bool streaming = false;                // Python wants every message (client streaming), not just the first
  bool finish_requested = false;         // Python called Finish (maybe waiting for writes)
  bool finish_started = false;           // stream.Finish/WriteAndFinish issued
  bool finish_done = false;
  bool done = false;                     // AsyncNotifyWhenDone fired
  grpc::Status final_status;
  int64_t deadline_ns = 0;
  std::string method;
};

class Frontend {
 public:
  Frontend(std::string address, int max_message_bytes)
      : address_(std::move(address)), max_message_bytes_(max_message_bytes) {
    efd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  }

  ~Frontend() {
    Stop(0.0);
    if (efd_ >= 0) close(efd_);
    // Closed only here: a Poll that started before Stop may still arm the watch afterwards.
    if (watch_epoll_ >= 0) close(watch_epoll_);
    if (watch_stop_ >= 0) close(watch_stop_);
  }

  // Bind and start serving. Returns the bound port, or 0 with *error set. ``polled``: no
  // completion-queue thread; the event loop's thread runs the queue in Poll (see there).
  int Start(std::string* error, bool polled) {
    if (efd_ < 0) {
      *error = "eventfd() failed";
      return 0;
    }
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort(address_, grpc::InsecureServerCredentials(), &port);
    builder.SetMaxReceiveMessageSize(max_message_bytes_);
    builder.SetMaxSendMessageSize(max_message_bytes_);
    builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
    builder.RegisterAsyncGenericService(&service_);
    cq_ = builder.AddCompletionQueue();
    server_ = builder.BuildAndStart();
    if (!server_ || port == 0) {
      *error = "could not bind " + address_;
      server_.reset();
      return 0;
    }
    // A few calls are always waiting for the next client, so a burst never waits on us.
    for (int i = 0; i < kListening; ++i) Listen();
    polled_ = polled;
    if (!polled) thread_ = std::thread([this] { Loop(); });
    return port;
  }

  // Polled mode: the event loop's selector blocks here instead of in epoll, so a request is read,
  // answered and its completions collected on one thread, with no hand-off between two threads
  // (each hand-off wakes a sleeping thread, which costs more than the request's own work when
  // requests arrive one at a time). Runs every ready completion; with ``timeout_s`` != 0 then
  // waits, up to ``timeout_s`` (< 0: no limit), until an event for Python was queued, the loop's
  // descriptors (``fd``, given to Watch) became ready, or the time passed. Returns kPending when
  // events wait for Drain, kIdle when not, kOff when the queue is shut down (or not polled):
  // the caller then waits on its descriptors alone.
  enum PollResult : int { kOff = 0, kIdle = 1, kPending = 2 };
  int Poll(double timeout_s) {
    if (!polled_) return kOff;
    const uint64_t before = pushed_.load(std::memory_order_relaxed);
    void* raw;
    bool ok;
    for (;;) {  // everything already complete
      auto st = cq_->AsyncNext(&raw, &ok, gpr_time_0(GPR_CLOCK_MONOTONIC));
      if (st == grpc::CompletionQueue::SHUTDOWN) return ShutDown();
      if (st == grpc::CompletionQueue::TIMEOUT) break;
      Handle(raw, ok);
    }
    if (timeout_s == 0 || pushed_.load(std::memory_order_relaxed) != before) return Pending();
    if (watched_ >= 0) Arm(EPOLL_CTL_MOD, watched_);  // report the loop's descriptors while we block
    gpr_timespec deadline = timeout_s < 0 ? gpr_inf_future(GPR_CLOCK_MONOTONIC)
                                          : gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                                                         gpr_time_from_micros(static_cast<int64_t>(timeout_s * 1e6),
                                                                              GPR_TIMESPAN));
    for (;;) {
      auto st = cq_->AsyncNext(&raw, &ok, deadline);
      if (st == grpc::CompletionQueue::SHUTDOWN) return ShutDown();
      if (st == grpc::CompletionQueue::TIMEOUT) return Pending();
      bool woke = Handle(raw, ok);
      if (woke || pushed_.load(std::memory_order_relaxed) != before) return Pending();
    }
  }

  int Pending() {
    std::lock_guard<std::mutex> lock(events_mu_);
    return events_.empty() ? kIdle : kPending;
  }

  // The queue is shut down; events this Poll queued before that still reach Drain.
  int ShutDown() { return Pending() == kPending ? kPending : kOff; }

  // Polled mode: watch the event loop's own descriptor set (an epoll fd) from a small thread that
  // only ends a blocking Poll when it becomes readable (timers are Poll's timeout).
  bool Watch(int fd) {
    if (!polled_ || watched_ >= 0) return false;
    watch_epoll_ = epoll_create1(EPOLL_CLOEXEC);
    watch_stop_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (watch_epoll_ < 0 || watch_stop_ < 0) return false;
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = watch_stop_;
    epoll_ctl(watch_epoll_, EPOLL_CTL_ADD, watch_stop_, &ev);
    if (!Arm(EPOLL_CTL_ADD, fd)) return false;
    watched_ = fd;
    watcher_ = std::thread([this] { WatchLoop(); });
    return true;
  }

  int fd() const { return efd_; }

  // Everything that happened since the last Drain, oldest first. Called with the GIL held: the
  // CQ thread takes events_mu_ only to push, never waiting for Python.
  std::vector<Event> Drain() {
    uint64_t ignored;
    ssize_t r = read(efd_, &ignored, sizeof ignored);  // reset the wake-up before taking the queue
    (void)r;
    std::vector<Event> out;
    std::lock_guard<std::mutex> lock(events_mu_);
    out.swap(events_);
    return out;
  }

  // Send one response message (streaming responses). False when the call is gone.
  bool Write(uint64_t id, std::string data) {
    std::shared_lock<std::shared_mutex> ops(ops_mu_);
    if (closed_) return false;
    std::unique_lock<std::mutex> lock;
    Call* c = Find(id, &lock);
    if (c == nullptr || c->finish_requested) return false;
    c->writes.push_back(ToBuffer(std::move(data)));
    PumpLocked(c);
    return true;
  }

  // A client-streaming call: read every message (and report the half-close), not only the first.
  bool Stream(uint64_t id) {
    std::shared_lock<std::shared_mutex> ops(ops_mu_);
    if (closed_) return false;
    std::unique_lock<std::mutex> lock;
    Call* c = Find(id, &lock);
    if (c == nullptr || c->streaming) return false;
    c->streaming = true;
    if (!c->read_in_flight && !c->finish_started) {
      c->read_in_flight = true;
      c->stream.Read(&c->read_buf, &c->read_tag);
    }
    return true;
  }

  // End the call with a status; ``last`` (when has_last) is sent as the final message with it.
  bool Finish(uint64_t id, int code, std::string details, bool has_last, std::string last) {
    std::shared_lock<std::shared_mutex> ops(ops_mu_);
    if (closed_) return false;
    std::unique_lock<std::mutex> lock;
    Call* c = Find(id, &lock);
    if (c == nullptr || c->finish_requested) return false;
    if (has_last) c->writes.push_back(ToBuffer(std::move(last)));
    c->finish_requested = true;
    c->final_status = grpc::Status(static_cast<grpc::StatusCode>(code), details);
    PumpLocked(c);
    return true;
  }

  // Stop accepting calls, give in-flight ones ``grace_s`` to finish, then cancel them.
  // Called with the GIL released while the event loop keeps answering the in-flight calls.
  void Stop(double grace_s) {
    std::lock_guard<std::mutex> lock(stop_mu_);
    if (!server_ || stopped_) return;
    stopped_ = true;
    {
      std::lock_guard<std::mutex> l(listen_mu_);  // no RequestCall may follow the shutdown
      shutting_down_ = true;
    }
    auto deadline = std::chrono::system_clock::now() +
                    std::chrono::microseconds(static_cast<int64_t>(grace_s * 1e6));
    server_->Shutdown(deadline);  // polled: the event loop keeps running the queue meanwhile
    {
      // From here no operation may start: the queue is about to refuse them.
      std::unique_lock<std::shared_mutex> ops(ops_mu_);
      closed_ = true;
      cq_->Shutdown();
    }
    if (thread_.joinable()) thread_.join();
    if (polled_) Loop();  // what is left in the queue, beside a Poll that may still be running
    if (watcher_.joinable()) {
      uint64_t one = 1;
      ssize_t r = write(watch_stop_, &one, sizeof one);
      (void)r;
      watcher_.join();
    }
  }

 private:
  static constexpr int kListening = 16;

  void Listen() {
    std::lock_guard<std::mutex> lock(listen_mu_);
    if (shutting_down_) return;
    Call* c = new Call(next_id_.fetch_add(1));
    c->ctx.AsyncNotifyWhenDone(&c->done_tag);
    service_.RequestCall(&c->ctx, &c->stream, cq_.get(), cq_.get(), &c->request_tag);
  }

  // The call with this id, its mutex held (taken under calls_mu_ so Release cannot race it).
  Call* Find(uint64_t id, std::unique_lock<std::mutex>* held) {
    std::lock_guard<std::mutex> lock(calls_mu_);
    auto it = calls_.find(id);
    if (it == calls_.end()) return nullptr;
    *held = std::unique_lock<std::mutex>(it->second->mu);
    return it->second;
  }

  void Push(Event e) {
    pushed_.fetch_add(1, std::memory_order_relaxed);
    bool wake;
    {
      std::lock_guard<std::mutex> lock(events_mu_);
      wake = events_.empty();
      events_.push_back(std::move(e));
    }
    // Polled, Poll's return value tells the loop's selector (no descriptor may wake the watcher).
    if (wake && (!polled_ || closed_)) {
      uint64_t one = 1;
      ssize_t r = write(efd_, &one, sizeof one);
      (void)r;
    }
  }

  // Start the next write, or the finish once every write has gone. Caller holds c->mu.
  void PumpLocked(Call* c) {
    if (closed_ || c->write_in_flight || c->finish_started || !c->started) return;
    if (c->finish_requested) {
      if (!c->final_status.ok()) c->writes.clear();  // an error status carries no message
      if (c->writes.empty()) {
        c->finish_started = true;
        c->stream.Finish(c->final_status, &c->finish_tag);
        return;
      }
      if (c->writes.size() == 1) {  // the usual unary answer: message and status in one operation
        c->finish_started = true;
        grpc::ByteBuffer last = std::move(c->writes.front());
        c->writes.clear();
        c->stream.WriteAndFinish(last, grpc::WriteOptions(), c->final_status, &c->finish_tag);
        return;
      }
    }
    if (!c->writes.empty()) {
      c->write_in_flight = true;
      grpc::ByteBuffer next = std::move(c->writes.front());
      c->writes.pop_front();
      c->stream.Write(next, &c->write_tag);
    }
  }

  // Delete the call once no operation of it can complete any more. Caller holds c->mu; on true
  // the caller must not touch c (it unlocks and deletes).
  bool FinishedLocked(Call* c) {
    return c->done && !c->read_in_flight && !c->write_in_flight && (c->finish_done || !c->started);
  }

  void Release(Call* c) {
    {
      std::lock_guard<std::mutex> lock(calls_mu_);
      calls_.erase(c->id);
    }
    // A Python-side Write/Finish that found the call before the erase holds c->mu: let it end.
    { std::lock_guard<std::mutex> lock(c->mu); }
    delete c;
  }

  void Loop() {
    void* raw;
    bool ok;
    while (cq_->Next(&raw, &ok)) Handle(raw, ok);
  }

  // Watch ``fd`` for one readiness report (EPOLLONESHOT): ``op`` ADD at first, MOD to re-arm.
  bool Arm(int op, int fd) {
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLONESHOT;
    ev.data.fd = fd;
    return epoll_ctl(watch_epoll_, op, fd, &ev) == 0;
  }

  void WatchLoop() {
    epoll_event evs[2];
    for (;;) {
      int n = epoll_wait(watch_epoll_, evs, 2, -1);
      for (int i = 0; i < n; ++i) {
        if (evs[i].data.fd == watch_stop_) return;
        Kick();
      }
    }
  }

  // End a blocking Poll (any thread). At most one wake-up is in the queue at a time.
  void Kick() {
    std::shared_lock<std::shared_mutex> ops(ops_mu_);
    if (closed_ || kick_pending_.exchange(true)) return;
    auto* w = new Wake();
    w->alarm.Set(cq_.get(), gpr_now(GPR_CLOCK_MONOTONIC), w);
  }

  // One completion. True for a wake-up (polled mode), which only ends a Poll.
  bool Handle(void* raw, bool ok) {
    Tag* tag = static_cast<Tag*>(raw);
    if (tag->op == Op::kWake) {
      delete static_cast<Wake*>(tag);
      kick_pending_.store(false);
      return true;
    }
    {
      Call* c = tag->call;
      bool release = false;
      {
        std::shared_lock<std::shared_mutex> ops(ops_mu_);  // closed_: start no new operation
        std::unique_lock<std::mutex> lock(c->mu);
        switch (tag->op) {
          case Op::kRequest:
            if (!ok) {  // the server is shutting down: this listener never got a call
              c->done = true;  // done_tag will not fire for a call that never started
              release = true;
              break;
            }
            c->started = true;
            c->method = c->ctx.method();
            {
              auto dl = c->ctx.deadline();
              if (dl != std::chrono::system_clock::time_point::max()) {
                auto left = std::chrono::duration_cast<std::chrono::nanoseconds>(
                                dl - std::chrono::system_clock::now()).count();
                c->deadline_ns = MonotonicNs() + left;
              }
            }
            {
              std::lock_guard<std::mutex> l2(calls_mu_);
              calls_[c->id] = c;
            }
            if (!closed_) {
              c->read_in_flight = true;
              c->stream.Read(&c->read_buf, &c->read_tag);
            }
            lock.unlock();
            if (!closed_) Listen();  // the next client's call
            lock.lock();
            break;
          case Op::kRead:
            c->read_in_flight = false;
            if (ok) {
              Event e{c->id, kMessage, c->method, ToString(c->read_buf), c->deadline_ns};
              c->read_buf.Clear();
              c->delivered = true;
              Push(std::move(e));
              if (c->streaming && !c->finish_started && !closed_) {
                c->read_in_flight = true;
                c->stream.Read(&c->read_buf, &c->read_tag);
              }
            } else if (!c->finish_requested) {  // the client is done sending (maybe without a message)
              c->delivered = true;
              Push(Event{c->id, kHalfClose, c->method, std::string(), c->deadline_ns});
            }
            break;
          case Op::kWrite:
            c->write_in_flight = false;
            if (!ok) c->writes.clear();  // the client is gone; the done notification follows
            PumpLocked(c);
            break;
          case Op::kFinish:
            c->finish_done = true;
            break;
          case Op::kDone:
            c->done = true;
            if (c->started && c->ctx.IsCancelled() && !c->finish_requested) {
              if (c->delivered) {
                Push(Event{c->id, kCancelled, c->method, std::string(), c->deadline_ns});
              } else {  // Python never saw it: finish it here
                c->finish_requested = true;
                c->final_status = grpc::Status(grpc::StatusCode::CANCELLED, "cancelled before it was read");
                PumpLocked(c);
              }
            }
            break;
          case Op::kWake:  // handled above
            break;
        }
        if (!release) release = FinishedLocked(c);
      }
      if (release) Release(c);
    }
    return false;
  }

  std::string address_;
  int max_message_bytes_;
  int efd_ = -1;
  grpc::AsyncGenericService service_;
  std::unique_ptr<grpc::ServerCompletionQueue> cq_;
  std::unique_ptr<grpc::Server> server_;
  std::thread thread_;
  bool polled_ = false;
  std::atomic<uint64_t> pushed_{0};
  std::atomic<bool> kick_pending_{false};
  int watched_ = -1, watch_epoll_ = -1, watch_stop_ = -1;
  std::thread watcher_;
  std::atomic<uint64_t> next_id_{1};
  std::mutex calls_mu_;
  std::unordered_map<uint64_t, Call*> calls_;
  std::mutex events_mu_;
  std::vector<Event> events_;
  std::mutex stop_mu_;
  bool stopped_ = false;
  std::mutex listen_mu_;
  bool shutting_down_ = false;
  std::shared_mutex ops_mu_;  // shared: starting operations; exclusive: shutting the queue down
  bool closed_ = false;
};

}  // namespace frontend
}  // namespace swapserve

PYBIND11_MODULE(_frontend, m) {
  using swapserve::frontend::Event;
  using swapserve::frontend::Frontend;
  m.doc() = "Native gRPC front end (grpc++ generic async server); see swapserve.server.native_frontend.";
  m.attr("MESSAGE") = static_cast<int>(swapserve::frontend::kMessage);
  m.attr("HALF_CLOSE") = static_cast<int>(swapserve::frontend::kHalfClose);
  m.attr("CANCELLED") = static_cast<int>(swapserve::frontend::kCancelled);
  m.attr("POLL_OFF") = static_cast<int>(Frontend::kOff);
  m.attr("POLL_IDLE") = static_cast<int>(Frontend::kIdle);
  m.attr("POLL_PENDING") = static_cast<int>(Frontend::kPending);
  py::class_<Frontend>(m, "Frontend")
      .def(py::init<std::string, int>(), py::arg("address"), py::arg("max_message_bytes"))
      .def("start",
           [](Frontend& f, bool polled) {
             std::string error;
             int port;
             {
               py::gil_scoped_release nogil;
               port = f.Start(&error, polled);
             }
             if (port == 0) throw std::runtime_error(error);  // pybind11 turns it into RuntimeError
             return port;
           },
           py::arg("polled") = false)
      .def("poll",
           [](Frontend& f, double timeout_s) {
             // A look without waiting takes microseconds and touches no Python object: keep the
             // GIL, so a thread waiting for it (control-path work) does not get a turn every time
             // the busy event loop looks for new requests.
             if (timeout_s == 0) return f.Poll(0);
             py::gil_scoped_release nogil;
             return f.Poll(timeout_s);
           })
      .def("watch", &Frontend::Watch)
      .def("fileno", &Frontend::fd)
      .def("drain",
           [](Frontend& f) {
             std::vector<Event> events = f.Drain();  // a swap under a mutex: the GIL stays held
             py::list out(events.size());
             for (size_t i = 0; i < events.size(); ++i) {
               Event& e = events[i];
               out[i] = py::make_tuple(e.call, e.kind, py::str(e.method), py::bytes(e.payload), e.deadline_ns);
             }
             return out;
           })
      .def("write",
           [](Frontend& f, uint64_t id, const py::bytes& data) {
             std::string s = data;
             py::gil_scoped_release nogil;
             return f.Write(id, std::move(s));
           })
      .def("stream",
           [](Frontend& f, uint64_t id) {
             py::gil_scoped_release nogil;
             return f.Stream(id);
           })
      .def("finish",
           [](Frontend& f, uint64_t id, int code, const std::string& details, py::object last) {
             bool has_last = !last.is_none();
             std::string s = has_last ? std::string(last.cast<py::bytes>()) : std::string();
             py::gil_scoped_release nogil;
             return f.Finish(id, code, details, has_last, std::move(s));
           },
           py::arg("id"), py::arg("code"), py::arg("details"), py::arg("last") = py::none())
      .def("stop",
           [](Frontend& f, double grace_s) {
             py::gil_scoped_release nogil;
             f.Stop(grace_s);
           });
}
