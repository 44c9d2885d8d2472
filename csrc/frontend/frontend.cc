#include "frontend.h"

#include <grpcpp/alarm.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_credentials_options.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <system_error>

#include "../core/clock.h"
#include "call.h"

namespace swapserve {
namespace frontend {

namespace {

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

// A failed system call as a Status: running out of descriptors or memory is the operator's to
// fix (the message says how), anything else is ours.
Status SystemError(const std::string& what, int err) {
  std::string msg = what + " failed: " + std::strerror(err);
  if (err == EMFILE || err == ENFILE)
    return Status::ResourceExhausted(msg + "; raise the open-file limit (ulimit -n) or serve with --frontend python");
  if (err == ENOMEM || err == EAGAIN) return Status::ResourceExhausted(msg + "; the machine is out of memory or threads");
  return Status::Internal(msg);
}

void CloseIfOpen(int fd) {
  if (fd >= 0) close(fd);
}

void WriteOne(int fd) {
  uint64_t one = 1;
  ssize_t r = write(fd, &one, sizeof one);
  (void)r;  // an eventfd only fails to count past 2^64-2: it is readable either way
}

}  // namespace

// ---------------------------------------------------------------------------- life cycle

Status Frontend::Create(std::string address, int max_message_bytes, std::unique_ptr<Frontend>* out,
                        TlsFiles tls) {
  const std::string who = "native front end for " + address + ": ";
  int efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (efd < 0) return SystemError(who + "eventfd()", errno);
  int watch_epoll = epoll_create1(EPOLL_CLOEXEC);
  if (watch_epoll < 0) {
    Status st = SystemError(who + "epoll_create1()", errno);
    close(efd);
    return st;
  }
  int watch_stop = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.fd = watch_stop;
  if (watch_stop < 0 || epoll_ctl(watch_epoll, EPOLL_CTL_ADD, watch_stop, &ev) != 0) {
    Status st = SystemError(who + (watch_stop < 0 ? "eventfd()" : "epoll_ctl(ADD)"), errno);
    CloseIfOpen(watch_stop);
    close(watch_epoll);
    close(efd);
    return st;
  }
  out->reset(new Frontend(std::move(address), max_message_bytes, efd, watch_epoll, watch_stop, std::move(tls)));
  return Status::Ok();
}

Frontend::Frontend(std::string address, int max_message_bytes, int efd, int watch_epoll, int watch_stop,
                   TlsFiles tls)
    : address_(std::move(address)),
      max_message_bytes_(max_message_bytes),
      tls_(std::move(tls)),
      efd_(efd),
      watch_epoll_(watch_epoll),
      watch_stop_(watch_stop) {}

Frontend::~Frontend() {
  Stop(0.0);
  // The queue is drained and no method runs any more (the owner is destroying us): what is left
  // are calls whose finish could not start once the queue closed. None has an operation pending.
  for (auto& entry : calls_) delete entry.second;
  calls_.clear();
  close(efd_);
  // Closed only here: a Poll that started before Stop may still arm the watch afterwards.
  close(watch_epoll_);
  close(watch_stop_);
}

std::shared_ptr<grpc::ServerCredentials> Frontend::Credentials() const {
  if (tls_.key_path.empty()) return grpc::InsecureServerCredentials();
  namespace gx = grpc::experimental;
  // grpc++ 1.51 reloads only through a certificate provider; the file watcher is the one that
  // changes what new handshakes use without touching open connections.
  auto provider = std::make_shared<gx::FileWatcherCertificateProvider>(tls_.key_path, tls_.cert_path, tls_.ca_path,
                                                                       kTlsRefreshS);
  gx::TlsServerCredentialsOptions options(provider);
  options.watch_identity_key_cert_pairs();
  if (!tls_.ca_path.empty()) {
    options.watch_root_certs();
    options.set_cert_request_type(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  } else {
    options.set_cert_request_type(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  }
  return gx::TlsServerCredentials(options);
}

Status Frontend::Start(bool polled, int* port) {
  if (start_called_) return Status::FailedPrecondition("native front end for " + address_ + ": Start may be called once");
  start_called_ = true;
  grpc::ServerBuilder builder;
  int bound = 0;
  builder.AddListeningPort(address_, Credentials(), &bound);
  builder.SetMaxReceiveMessageSize(max_message_bytes_);
  builder.SetMaxSendMessageSize(max_message_bytes_);
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.RegisterAsyncGenericService(&service_);
  cq_ = builder.AddCompletionQueue();
  server_ = builder.BuildAndStart();
  if (!server_ || bound == 0) {
    // Nothing was ever queued on cq_. It stays, unshut, until the destructor: grpc++ refuses
    // (and logs) a shutdown of a queue whose server was never built.
    server_.reset();
    return Status::Unavailable("could not bind " + address_ + " (in use, or not an address of this host)");
  }
  polled_ = polled;
  for (int i = 0; i < kListening; ++i) Listen();  // a burst never waits for a listener
  if (!polled) {
    try {
      thread_ = std::thread([this] { Loop(); });
    } catch (const std::system_error& e) {
      Stop(0.0);
      Loop();  // the listeners' cancelled requests: no thread runs the queue
      return SystemError("native front end for " + address_ + ": starting its completion-queue thread",
                         e.code().value());
    }
  }
  *port = bound;
  return Status::Ok();
}

// Stop: server shutdown (grace for in-flight calls), then the queue; threads joined last.
void Frontend::Stop(double grace_s) {
  std::lock_guard<std::mutex> lock(stop_mu_);
  if (!server_ || stopped_) return;
  stopped_ = true;
  {
    std::lock_guard<std::mutex> l(listen_mu_);  // no RequestCall may follow the shutdown
    shutting_down_ = true;
  }
  auto deadline = std::chrono::system_clock::now() + std::chrono::microseconds(static_cast<int64_t>(grace_s * 1e6));
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
    WriteOne(watch_stop_);
    watcher_.join();
  }
}

// ---------------------------------------------------------------------------- polled mode

PollResult Frontend::Poll(double timeout_s) {
  if (!polled_) return PollResult::kOff;
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
  gpr_timespec deadline =
      timeout_s < 0 ? gpr_inf_future(GPR_CLOCK_MONOTONIC)
                    : gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                                   gpr_time_from_micros(static_cast<int64_t>(timeout_s * 1e6), GPR_TIMESPAN));
  for (;;) {
    auto st = cq_->AsyncNext(&raw, &ok, deadline);
    if (st == grpc::CompletionQueue::SHUTDOWN) return ShutDown();
    if (st == grpc::CompletionQueue::TIMEOUT) return Pending();
    bool woke = Handle(raw, ok);
    if (woke || pushed_.load(std::memory_order_relaxed) != before) return Pending();
  }
}

PollResult Frontend::Pending() {
  std::lock_guard<std::mutex> lock(events_mu_);
  return events_.empty() ? PollResult::kIdle : PollResult::kPending;
}

// The queue is shut down; events this Poll queued before that still reach Drain.
PollResult Frontend::ShutDown() { return Pending() == PollResult::kPending ? PollResult::kPending : PollResult::kOff; }

Status Frontend::Watch(int fd) {
  if (!polled_) return Status::FailedPrecondition("native front end for " + address_ + ": Watch needs the polled mode");
  if (watched_ >= 0)
    return Status::FailedPrecondition("native front end for " + address_ + " already watches descriptor " +
                                      std::to_string(watched_));
  if (!Arm(EPOLL_CTL_ADD, fd))
    return SystemError("native front end for " + address_ + ": watching the event loop's descriptor " +
                       std::to_string(fd) + " (epoll_ctl ADD)", errno);
  try {
    watcher_ = std::thread([this] { WatchLoop(); });
  } catch (const std::system_error& e) {
    epoll_ctl(watch_epoll_, EPOLL_CTL_DEL, fd, nullptr);
    return SystemError("native front end for " + address_ + ": starting its watcher thread", e.code().value());
  }
  watched_ = fd;
  return Status::Ok();
}

// Watch ``fd`` for one readiness report (EPOLLONESHOT): ``op`` ADD at first, MOD to re-arm.
bool Frontend::Arm(int op, int fd) {
  epoll_event ev{};
  ev.events = EPOLLIN | EPOLLONESHOT;
  ev.data.fd = fd;
  return epoll_ctl(watch_epoll_, op, fd, &ev) == 0;
}

void Frontend::WatchLoop() {
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
void Frontend::Kick() {
  std::shared_lock<std::shared_mutex> ops(ops_mu_);
  if (closed_ || kick_pending_.exchange(true)) return;
  auto* w = new Wake();
  w->alarm.Set(cq_.get(), gpr_now(GPR_CLOCK_MONOTONIC), w);
}

// ---------------------------------------------------------------------------- Python's side

std::vector<Event> Frontend::Drain() {
  uint64_t ignored;
  ssize_t r = read(efd_, &ignored, sizeof ignored);  // reset the wake-up before taking the queue
  (void)r;
  std::vector<Event> out;
  std::lock_guard<std::mutex> lock(events_mu_);
  out.swap(events_);
  return out;
}

WriteResult Frontend::Write(uint64_t id, std::string data) {
  std::shared_lock<std::shared_mutex> ops(ops_mu_);
  if (closed_) return WriteResult::kGone;
  std::unique_lock<std::mutex> lock;
  Call* c = Find(id, &lock);
  if (c == nullptr || c->finish_requested()) return WriteResult::kGone;
  c->queued_write_bytes += data.size();
  c->writes.push_back(ToBuffer(std::move(data)));
  PumpLocked(c);
  if (c->writes.size() < kMaxQueuedWrites && c->queued_write_bytes < kMaxQueuedWriteBytes) return WriteResult::kQueued;
  c->write_blocked = true;
  return WriteResult::kFull;
}

bool Frontend::CallInfo(uint64_t id, std::string* peer,
                        std::vector<std::pair<std::string, std::string>>* metadata) {
  std::unique_lock<std::mutex> lock;
  Call* c = Find(id, &lock);
  if (c == nullptr) return false;
  // client_metadata() is filled before the call arrives and never changes after: reading it
  // under the call's mutex, while the queue runs other operations of the call, is safe.
  *peer = c->ctx.peer();
  for (const auto& kv : c->ctx.client_metadata()) {
    std::string key(kv.first.data(), kv.first.size());
    if (key.size() >= 4 && key.compare(key.size() - 4, 4, "-bin") == 0) continue;
    metadata->emplace_back(std::move(key), std::string(kv.second.data(), kv.second.size()));
  }
  return true;
}

bool Frontend::AuthInfo(uint64_t id, std::vector<std::pair<std::string, std::string>>* properties) {
  std::unique_lock<std::mutex> lock;
  Call* c = Find(id, &lock);
  if (c == nullptr) return false;
  // The auth context is fixed by the handshake, before the call arrives.
  std::shared_ptr<const grpc::AuthContext> auth = c->ctx.auth_context();
  if (auth == nullptr) return true;
  for (const char* name : {"x509_common_name", "x509_subject_alternative_name", "transport_security_type"}) {
    for (const auto& value : auth->FindPropertyValues(name)) {
      properties->emplace_back(name, std::string(value.data(), value.size()));
    }
  }
  return true;
}

bool Frontend::Read(uint64_t id) {
  std::shared_lock<std::shared_mutex> ops(ops_mu_);
  if (closed_) return false;
  std::unique_lock<std::mutex> lock;
  Call* c = Find(id, &lock);
  if (c == nullptr || c->half_closed || (c->outstanding & kReadOutstanding) || c->finish_requested()) return false;
  c->outstanding |= kReadOutstanding;
  c->stream.Read(&c->read_buf, &c->read_tag);
  return true;
}

bool Frontend::Finish(uint64_t id, int code, std::string details, std::optional<std::string> last) {
  std::shared_lock<std::shared_mutex> ops(ops_mu_);
  if (closed_) return false;
  std::unique_lock<std::mutex> lock;
  Call* c = Find(id, &lock);
  if (c == nullptr || c->finish_requested()) return false;
  c->state = CallState::kFinishPending;
  c->final_status = grpc::Status(static_cast<grpc::StatusCode>(code), std::move(details));
  if (!c->final_status.ok()) {
    c->ClearWrites();  // an error status carries no message: free them now, not behind a stalled write
  } else if (last) {
    c->queued_write_bytes += last->size();
    c->writes.push_back(ToBuffer(std::move(*last)));
  }
  PumpLocked(c);
  return true;
}

// ---------------------------------------------------------------------------- calls

void Frontend::Listen() {
  std::lock_guard<std::mutex> lock(listen_mu_);
  if (shutting_down_) return;
  Call* c = new Call(next_id_.fetch_add(1));
  c->ctx.AsyncNotifyWhenDone(&c->done_tag);
  service_.RequestCall(&c->ctx, &c->stream, cq_.get(), cq_.get(), &c->request_tag);
}

// The call with this id, its mutex held. The call's mutex is taken while calls_mu_ is still
// held, so Release (erase, then lock the call's mutex) cannot delete it under us.
Call* Frontend::Find(uint64_t id, std::unique_lock<std::mutex>* held) {
  std::lock_guard<std::mutex> lock(calls_mu_);
  auto it = calls_.find(id);
  if (it == calls_.end()) return nullptr;
  *held = std::unique_lock<std::mutex>(it->second->mu);
  return it->second;
}

void Frontend::Push(Event e) {
  pushed_.fetch_add(1, std::memory_order_relaxed);
  bool wake;
  {
    std::lock_guard<std::mutex> lock(events_mu_);
    wake = events_.empty();
    events_.push_back(std::move(e));
  }
  // Polled, Poll's return value tells the loop's selector (no descriptor may wake the watcher).
  if (wake && (!polled_ || closed_)) WriteOne(efd_);
}

// Start the next write, or the finish once every write has gone. Caller holds c->mu.
void Frontend::PumpLocked(Call* c) {
  if (closed_ || (c->outstanding & kWriteOutstanding) || c->state == CallState::kListening ||
      c->state >= CallState::kFinishing)
    return;
  if (c->state == CallState::kFinishPending) {
    if (!c->final_status.ok()) c->ClearWrites();  // an error status carries no message
    if (c->writes.empty()) {
      c->state = CallState::kFinishing;
      c->stream.Finish(c->final_status, &c->finish_tag);
      return;
    }
    if (c->writes.size() == 1) {  // the usual unary answer: message and status in one operation
      c->state = CallState::kFinishing;
      grpc::ByteBuffer last = std::move(c->writes.front());
      c->writes.clear();
      c->stream.WriteAndFinish(last, grpc::WriteOptions(), c->final_status, &c->finish_tag);
      return;
    }
  }
  if (!c->writes.empty()) {
    c->outstanding |= kWriteOutstanding;
    grpc::ByteBuffer next = std::move(c->writes.front());
    c->writes.pop_front();
    c->writing_bytes = next.Length();
    c->stream.Write(next, &c->write_tag);
  }
}

void Frontend::Release(Call* c) {
  {
    std::lock_guard<std::mutex> lock(calls_mu_);
    calls_.erase(c->id);
  }
  // A Write/Stream/Finish that found the call before the erase holds c->mu: let it end.
  { std::lock_guard<std::mutex> lock(c->mu); }
  delete c;
}

void Frontend::Loop() {
  void* raw;
  bool ok;
  while (cq_->Next(&raw, &ok)) Handle(raw, ok);
}

// One completion. True for a wake-up (polled mode), which only ends a Poll.
bool Frontend::Handle(void* raw, bool ok) {
  Tag* tag = static_cast<Tag*>(raw);
  switch (tag->op) {
    case Op::kWake:
      delete static_cast<Wake*>(tag);
      kick_pending_.store(false);
      return true;
    case Op::kRequest:
      OnRequest(tag->call, ok);
      return false;
    default:
      OnCompletion(tag->call, tag->op, ok);
      return false;
  }
}

// A listener's RequestCall completed: a client's call arrived (ok), or the server shut down.
void Frontend::OnRequest(Call* c, bool ok) {
  bool listen = false;
  bool release = false;
  {
    std::shared_lock<std::shared_mutex> ops(ops_mu_);  // closed_: start no new operation
    // Published before it can be found: Python learns the id only from the event pushed later.
    std::unique_lock<std::mutex> calls_lock(calls_mu_, std::defer_lock);
    if (ok) calls_lock.lock();
    std::unique_lock<std::mutex> lock(c->mu);
    if (!ok) {
      // This listener never got a call; its done notification will not fire.
      c->outstanding &= ~kDoneOutstanding;
      release = c->releasable();
    } else {
      calls_[c->id] = c;
      calls_lock.unlock();
      c->state = CallState::kArrived;
      c->method = c->ctx.method();
      auto dl = c->ctx.deadline();
      if (dl != std::chrono::system_clock::time_point::max()) {
        auto left =
            std::chrono::duration_cast<std::chrono::nanoseconds>(dl - std::chrono::system_clock::now()).count();
        c->deadline_ns = MonotonicNowNs() + left;
      }
      if (!closed_) {
        c->outstanding |= kReadOutstanding;
        c->stream.Read(&c->read_buf, &c->read_tag);
        listen = true;
      }
      release = c->releasable();
    }
    // c is not touched after this block unless release (then this thread deletes it).
  }
  if (release) Release(c);
  if (listen) {  // the next client's call; under ops_mu_ so the queue cannot close meanwhile
    std::shared_lock<std::shared_mutex> ops(ops_mu_);
    if (!closed_) Listen();
  }
}

// Any other operation of a call completed.
void Frontend::OnCompletion(Call* c, Op op, bool ok) {
  bool release;
  {
    std::shared_lock<std::shared_mutex> ops(ops_mu_);  // closed_: start no new operation
    std::unique_lock<std::mutex> lock(c->mu);
    switch (op) {
      case Op::kRead:
        c->outstanding &= ~kReadOutstanding;
        if (ok) {
          Event e{c->id, EventKind::kMessage, c->method, ToString(c->read_buf), c->deadline_ns};
          c->read_buf.Clear();
          if (c->state == CallState::kArrived) c->state = CallState::kDelivered;
          Push(std::move(e));  // the next read waits for Python's Read: it has room for one more
        } else if (!c->finish_requested()) {  // the client is done sending (maybe without a message)
          c->state = CallState::kDelivered;
          c->half_closed = true;
          Push(Event{c->id, EventKind::kHalfClose, c->method, std::string(), c->deadline_ns});
        }
        break;
      case Op::kWrite:
        c->outstanding &= ~kWriteOutstanding;
        c->queued_write_bytes -= c->writing_bytes;
        c->writing_bytes = 0;
        if (!ok) c->ClearWrites();  // the client is gone; the done notification follows (kCancelled)
        PumpLocked(c);
        if (ok && c->write_blocked && !c->finish_requested() && c->writes.size() <= kMaxQueuedWrites / 2 &&
            c->queued_write_bytes <= kMaxQueuedWriteBytes / 2) {
          c->write_blocked = false;
          Push(Event{c->id, EventKind::kWritable, c->method, std::string(), c->deadline_ns});
        }
        break;
      case Op::kFinish:
        c->state = CallState::kFinished;
        break;
      case Op::kDone:
        c->outstanding &= ~kDoneOutstanding;
        if (c->state != CallState::kListening && c->ctx.IsCancelled() && !c->finish_requested()) {
          if (c->state == CallState::kDelivered) {
            Push(Event{c->id, EventKind::kCancelled, c->method, std::string(), c->deadline_ns});
          } else {  // Python never saw it: finish it here
            c->state = CallState::kFinishPending;
            c->final_status = grpc::Status(grpc::StatusCode::CANCELLED, "cancelled before it was read");
            PumpLocked(c);
          }
        }
        break;
      case Op::kRequest:  // OnRequest
      case Op::kWake:     // Handle
        break;
    }
    release = c->releasable();
  }
  if (release) Release(c);
}

}  // namespace frontend
}  // namespace swapserve
