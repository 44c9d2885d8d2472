// swapserve-loadgen: the native worker of `swapserve bench` (driven by src/swapserve/bench/native.py).
//
// It speaks the worker protocol of src/swapserve/bench/loop.py, so the runner treats it like
// the Python workers; what differs is the cost per request (grpc++ instead of grpc.aio, and
// no interpreter), which matters because client and server share the machine's cores.
//
//   swapserve-loadgen SPEC.json PAYLOADS.bin OUT.bin
//
// SPEC.json     one flat JSON object of numbers and strings (nothing nested), e.g.
//               {"url": "127.0.0.1:8001", "method": "/inference.GRPCInferenceService/ModelInfer",
//                "duration_s": 11.0, "timeout_s": 30.0, "concurrency": 32, "rate": 0.0,
//                "slot": 0, "slots": 1, "first_payload": 0}
// PAYLOADS.bin  little-endian u32 count, then per payload u32 length + bytes: pre-serialised
//               ModelInferRequest messages, sent as they are (no protobuf code in here).
// OUT.bin       the records of the run; layout at WriteOutput() below.
//
// Protocol (stdout lines are flushed at once):
//   -> connects, makes one untimed call, prints "ready"
//   <- one line on stdin: the start time in CLOCK_MONOTONIC ns (Python's time.monotonic_ns(),
//      the same clock in every process on Linux), or "abort" (exit 1)
//   -> sleeps until the start; closed loop (concurrency > 0, rate == 0) or open loop (rate > 0)
//      until start + duration_s; awaits every call in flight (each has a deadline of timeout_s);
//      prints "progress COMPLETED ERRORS" every second; writes OUT.bin; prints "done"
//
// Guarantees (as loop.py): every request that is scheduled is recorded exactly once, as OK
// (status 0) or with its gRPC status code, so completed + errors = sent. A response whose
// top-level wire format cannot be scanned counts as a client-side error, UNKNOWN (2).
//
// Design: one thread drives one CompletionQueue. Closed loop: the completion of a call starts
// the next one. Open loop: arrival k of this process is due at start + (slot + k*slots)/rate
// seconds whatever is in flight; the queue is waited on with AsyncNext until shortly before
// the next arrival, then polled finely (see kFineNs), and an arrival that is late (the loop was
// busy) is sent at once, its lateness showing as send lag (sent - sched). Payloads are
// grpc::ByteBuffers built once; sending one only takes a reference to its slice.
//
// Exit codes: 0 done, 1 aborted before the start, 2 bad arguments or input files.

#include <grpc/support/time.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <sys/resource.h>
#include <time.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "../core/clock.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "PAYLOADS.bin and OUT.bin are little-endian and read/written in host order"
#endif

namespace {

constexpr int64_t kSecondNs = 1000000000LL;
// Status recorded for a failure that carries no gRPC status (loop.CLIENT_ERROR).
constexpr int8_t kClientError = 2;  // UNKNOWN
// First 8 bytes of OUT.bin (bench/native.py checks them).
constexpr char kOutMagic[8] = {'S', 'S', 'L', 'O', 'A', 'D', '0', '1'};
// gRPC's poller (1.51) sleeps in whole milliseconds and wakes up to 2 ms after an AsyncNext
// deadline: as the deadline of every open-loop arrival that would be ~0.8 ms of send lag at
// the median (measured), added to every latency. So the queue is waited on until kFineNs
// before an arrival, and the rest is waited out here: poll without blocking, then sleep at
// most kStepNs (the longest a finished call then waits to be timestamped) and poll again.
// With this the median lag is ~0.1 ms (the VM's timer wake-up), at some CPU per request at
// low rates; at high rates arrivals are closer than kStepNs and nothing changes.
constexpr int64_t kFineNs = 2000000;
constexpr int64_t kStepNs = 250000;

// CLOCK_MONOTONIC in ns: the clock of the start time the runner sends.
int64_t NowNs() { return swapserve::MonotonicNowNs(); }

void SleepUntil(int64_t ns) {
  if (ns <= 0) return;
  timespec ts{static_cast<time_t>(ns / kSecondNs), static_cast<long>(ns % kSecondNs)};
  while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, nullptr) == EINTR) {
  }
}

// User + system CPU of the whole process (gRPC's own threads included), like os.times().
double CpuSeconds() {
  rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  auto s = [](const timeval& tv) { return static_cast<double>(tv.tv_sec) + tv.tv_usec / 1e6; };
  return s(ru.ru_utime) + s(ru.ru_stime);
}

// A deadline `ns` from now on gRPC's monotonic clock (its epoch differs from ours, so only
// durations cross between the two).
gpr_timespec DeadlineIn(int64_t ns) {
  return gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_nanos(std::max<int64_t>(ns, 0), GPR_TIMESPAN));
}

[[noreturn]] void Fail(const std::string& message) {
  std::cerr << "swapserve-loadgen: " << message << std::endl;
  std::exit(2);
}

// ---------------------------------------------------------------------------------------
// Input files

struct Spec {
  std::string url;
  std::string method = "/inference.GRPCInferenceService/ModelInfer";
  double duration_s = 0;
  double timeout_s = 30;
  int64_t concurrency = 0;  // closed loop: calls in flight in this process
  double rate = 0;          // open loop: total arrival rate of all processes (req/s)
  int64_t slot = 0;         // open loop: this process takes arrivals slot, slot+slots, ...
  int64_t slots = 1;
  int64_t first_payload = 0;
};

void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

// Reads a flat JSON object whose values are strings or numbers: key -> value text (strings
// unescaped; a surrogate pair, i.e. a character outside the BMP, is not combined). Anything
// else (nesting, arrays, true/false/null) is refused rather than misread.
class FlatJson {
 public:
  explicit FlatJson(std::string_view text) : s_(text) {}

  bool Parse(std::map<std::string, std::string>* out) {
    if (!Eat('{')) return false;
    if (Eat('}')) return AtEnd();
    do {
      std::string key, value;
      if (!String(&key) || !Eat(':')) return false;
      Skip();
      if (i_ < s_.size() && s_[i_] == '"') {
        if (!String(&value)) return false;
      } else if (!Number(&value)) {
        return false;
      }
      (*out)[key] = value;
    } while (Eat(','));
    return Eat('}') && AtEnd();
  }

 private:
  void Skip() {
    while (i_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[i_]))) ++i_;
  }
  bool Eat(char c) {
    Skip();
    if (i_ < s_.size() && s_[i_] == c) {
      ++i_;
      return true;
    }
    return false;
  }
  bool AtEnd() {
    Skip();
    return i_ == s_.size();
  }
  bool Number(std::string* out) {
    size_t begin = i_;
    while (i_ < s_.size() && std::strchr("+-.0123456789eE", s_[i_]) != nullptr) ++i_;
    *out = std::string(s_.substr(begin, i_ - begin));
    return i_ > begin;
  }
  bool String(std::string* out) {
    if (!Eat('"')) return false;
    while (i_ < s_.size()) {
      char c = s_[i_++];
      if (c == '"') return true;
      if (c != '\\') {
        out->push_back(c);
        continue;
      }
      if (i_ >= s_.size()) return false;
      char e = s_[i_++];
      switch (e) {
        case '"': case '\\': case '/': out->push_back(e); break;
        case 'b': out->push_back('\b'); break;
        case 'f': out->push_back('\f'); break;
        case 'n': out->push_back('\n'); break;
        case 'r': out->push_back('\r'); break;
        case 't': out->push_back('\t'); break;
        case 'u': {
          if (i_ + 4 > s_.size()) return false;
          std::string hex(s_.substr(i_, 4));
          char* end = nullptr;
          unsigned long cp = std::strtoul(hex.c_str(), &end, 16);
          if (end != hex.c_str() + 4) return false;
          AppendUtf8(static_cast<uint32_t>(cp), out);
          i_ += 4;
          break;
        }
        default: return false;
      }
    }
    return false;  // unterminated
  }

  std::string_view s_;  // the document; borrowed
  size_t i_ = 0;        // read position
};

std::string ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) Fail("cannot open " + path + ": " + std::strerror(errno));
  return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

Spec ReadSpec(const std::string& path) {
  std::map<std::string, std::string> kv;
  if (!FlatJson(ReadFile(path)).Parse(&kv))
    Fail(path + " is not a flat JSON object of strings and numbers (bench/native.py writes it)");
  auto need = [&](const char* key) -> const std::string& {
    auto it = kv.find(key);
    if (it == kv.end()) Fail(path + " has no \"" + key + "\"");
    return it->second;
  };
  auto number = [&](const char* key) {
    const std::string& text = need(key);
    char* end = nullptr;
    double v = std::strtod(text.c_str(), &end);
    if (text.empty() || *end != '\0') Fail(path + ": \"" + key + "\" is not a number: " + text);
    return v;
  };
  Spec spec;
  spec.url = need("url");
  if (kv.count("method")) spec.method = kv["method"];
  spec.duration_s = number("duration_s");
  spec.timeout_s = number("timeout_s");
  spec.concurrency = static_cast<int64_t>(number("concurrency"));
  spec.rate = number("rate");
  spec.slot = static_cast<int64_t>(number("slot"));
  spec.slots = static_cast<int64_t>(number("slots"));
  spec.first_payload = static_cast<int64_t>(number("first_payload"));
  if (spec.url.empty()) Fail(path + ": empty \"url\"");
  if (spec.timeout_s <= 0) Fail(path + ": \"timeout_s\" must be > 0");
  if (spec.slots < 1 || spec.slot < 0 || spec.slot >= spec.slots) Fail(path + ": need 0 <= slot < slots");
  if (spec.concurrency < 0 || spec.rate < 0 || spec.first_payload < 0)
    Fail(path + ": concurrency, rate and first_payload must be >= 0");
  return spec;
}

std::vector<grpc::ByteBuffer> ReadPayloads(const std::string& path) {
  std::string data = ReadFile(path);
  size_t pos = 0;
  auto u32 = [&]() {
    if (pos + 4 > data.size()) Fail(path + " is truncated at byte " + std::to_string(pos));
    uint32_t v;
    std::memcpy(&v, data.data() + pos, 4);
    pos += 4;
    return v;
  };
  uint32_t count = u32();
  if (count == 0) Fail(path + " holds no payloads");
  std::vector<grpc::ByteBuffer> out;
  out.reserve(count);
  for (uint32_t k = 0; k < count; ++k) {
    uint32_t size = u32();
    if (pos + size > data.size()) Fail(path + ": payload " + std::to_string(k) + " is truncated");
    grpc::Slice slice(data.data() + pos, size);  // copied: owned by the slice from here on
    out.emplace_back(&slice, 1);
    pos += size;
  }
  if (pos != data.size()) Fail(path + " has " + std::to_string(data.size() - pos) + " trailing bytes");
  return out;
}

// ---------------------------------------------------------------------------------------
// Responses

bool ReadVarint(const uint8_t** p, const uint8_t* end, uint64_t* value) {
  uint64_t result = 0;
  for (int shift = 0; shift < 64 && *p < end; shift += 7) {
    uint8_t b = *(*p)++;
    result |= static_cast<uint64_t>(b & 0x7F) << shift;
    if (b < 0x80) {
      *value = result;
      return true;
    }
  }
  return false;
}

// ModelInferResponse.model_version (field 2, length-delimited) from the wire bytes, scanning
// top-level fields only (a port of worker_raw.response_version; the last occurrence wins, as
// in protobuf). False when the bytes are not well-formed wire format.
bool ResponseVersion(std::string_view buf, std::string_view* version) {
  const uint8_t* p = reinterpret_cast<const uint8_t*>(buf.data());
  const uint8_t* end = p + buf.size();
  *version = {};
  while (p < end) {
    uint64_t key, v;
    if (!ReadVarint(&p, end, &key)) return false;
    switch (key & 7) {
      case 0:
        if (!ReadVarint(&p, end, &v)) return false;
        break;
      case 1:
        if (end - p < 8) return false;
        p += 8;
        break;
      case 2:
        if (!ReadVarint(&p, end, &v) || v > static_cast<uint64_t>(end - p)) return false;
        if (key >> 3 == 2) *version = std::string_view(reinterpret_cast<const char*>(p), v);
        p += v;
        break;
      case 5:
        if (end - p < 4) return false;
        p += 4;
        break;
      default:  // groups never appear in these messages
        return true;
    }
  }
  return true;
}

// ---------------------------------------------------------------------------------------
// Records

// Columnar per-request records (the arrays of loop.Recorder).
struct Records {
  std::vector<int64_t> sched, sent, done;  // CLOCK_MONOTONIC ns
  std::vector<int8_t> status;              // gRPC status code, 0 = OK
  std::vector<int16_t> version;            // index into table, -1 for errors
  std::vector<std::string> table;          // distinct model_version strings, in first-seen order
  int64_t errors = 0;

  void Add(int64_t sched_ns, int64_t sent_ns, int64_t done_ns, int8_t code, std::string_view v) {
    sched.push_back(sched_ns);
    sent.push_back(sent_ns);
    done.push_back(done_ns);
    status.push_back(code);
    if (code != 0) {
      ++errors;
      version.push_back(-1);
      return;
    }
    version.push_back(Index(v));
  }

  // A linear search: a run sees a handful of versions.
  int16_t Index(std::string_view v) {
    for (size_t k = 0; k < table.size(); ++k)
      if (table[k] == v) return static_cast<int16_t>(k);
    if (table.size() >= 32767) Fail("more than 32767 distinct model_version strings in responses");
    table.emplace_back(v);
    return static_cast<int16_t>(table.size() - 1);
  }

  int64_t completed() const { return static_cast<int64_t>(status.size()) - errors; }
};

// OUT.bin, all little-endian, every array aligned to its element size:
//   offset 0   char[8]  magic "SSLOAD01"
//          8   u64      n, the number of requests
//         16   f64      cpu_s: user + system CPU of this process from the start to the drain
//         24   u32      t, the number of version strings
//         28   u32      0 (padding)
//         32   i64[n] sched, i64[n] sent, i64[n] done, i16[n] version, i8[n] status
//   then t times: u32 length + UTF-8 bytes of the version string with that index
void WriteOutput(const std::string& path, const Records& r, double cpu_s) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) Fail("cannot write " + path + ": " + std::strerror(errno));
  auto put = [&](const void* p, size_t n) { f.write(static_cast<const char*>(p), static_cast<std::streamsize>(n)); };
  uint64_t n = r.status.size();
  uint32_t t = static_cast<uint32_t>(r.table.size()), pad = 0;
  put(kOutMagic, 8);
  put(&n, 8);
  put(&cpu_s, 8);
  put(&t, 4);
  put(&pad, 4);
  put(r.sched.data(), n * 8);
  put(r.sent.data(), n * 8);
  put(r.done.data(), n * 8);
  put(r.version.data(), n * 2);
  put(r.status.data(), n);
  for (const std::string& s : r.table) {
    uint32_t len = static_cast<uint32_t>(s.size());
    put(&len, 4);
    put(s.data(), s.size());
  }
  f.close();
  if (!f) Fail("cannot write " + path + ": " + std::strerror(errno));
}

// ---------------------------------------------------------------------------------------
// The load generator

// One request in flight. Owned by LoadGen from Start() until its completion is taken off
// the queue; the queue's tag is the Call itself.
struct Call {
  grpc::ClientContext context;                                 // deadline; one per call
  grpc::ByteBuffer response;                                   // filled by Finish
  grpc::Status status;                                         // filled by Finish
  std::unique_ptr<grpc::GenericClientAsyncResponseReader> rpc;  // keeps the call alive
  int64_t sched_ns = 0;
  int64_t sent_ns = 0;
};

class LoadGen {
 public:
  LoadGen(Spec spec, std::vector<grpc::ByteBuffer> payloads)
      : spec_(std::move(spec)), payloads_(std::move(payloads)), channel_(MakeChannel(spec_.url)), stub_(channel_) {}

  // Drains the queue: it must be empty before it is destroyed.
  ~LoadGen() {
    cq_.Shutdown();
    void* tag;
    bool ok;
    while (cq_.Next(&tag, &ok)) delete static_cast<Call*>(tag);
  }

  // One call whose outcome is not recorded: connection set-up stays out of the run.
  void Warm() {
    int64_t now = NowNs();
    Start(static_cast<uint64_t>(spec_.first_payload), now, now);
    void* tag;
    bool ok;
    if (cq_.Next(&tag, &ok)) {
      delete static_cast<Call*>(tag);
      --in_flight_;
    }
  }

  // Runs the load from `start_ns` (CLOCK_MONOTONIC) and returns when nothing is in flight.
  void Run(int64_t start_ns) {
    const int64_t end = start_ns + static_cast<int64_t>(spec_.duration_s * 1e9);
    const bool open = spec_.rate > 0;
    const double interval = open ? 1e9 / spec_.rate : 0.0;
    // Open loop: arrival k of this process, due at start + (slot + k*slots) * interval.
    int64_t k = 0;
    auto due_of = [&](int64_t i) {
      return start_ns + static_cast<int64_t>(static_cast<double>(spec_.slot + i * spec_.slots) * interval);
    };
    int64_t due = open ? due_of(0) : end;
    bool scheduling = open && due < end;
    // Closed loop: one payload sequence for all users (round-robin), as loop._closed.
    uint64_t sends = static_cast<uint64_t>(spec_.first_payload);
    if (!open) {
      for (int64_t u = 0; u < spec_.concurrency; ++u) {
        int64_t t = NowNs();
        if (t >= end) break;
        Start(sends++, t, t);
      }
    }
    int64_t next_progress = start_ns + kSecondNs;
    for (;;) {
      int64_t now = NowNs();
      while (scheduling && due <= now) {  // late arrivals go out at once; their lag is recorded
        Start(static_cast<uint64_t>(spec_.first_payload + k), due, now);
        due = due_of(++k);
        scheduling = due < end;
        now = NowNs();
      }
      if (now >= next_progress) {
        std::printf("progress %lld %lld\n", static_cast<long long>(records_.completed()),
                    static_cast<long long>(records_.errors));
        std::fflush(stdout);
        while (next_progress <= now) next_progress += kSecondNs;
      }
      if (!scheduling && in_flight_ == 0) return;
      void* tag;
      bool ok;
      grpc::CompletionQueue::NextStatus got;
      if (scheduling && due - now <= kFineNs) {
        got = cq_.AsyncNext(&tag, &ok, gpr_inf_past(GPR_CLOCK_MONOTONIC));  // never blocks
        if (got == grpc::CompletionQueue::TIMEOUT) {
          SleepUntil(in_flight_ > 0 ? std::min(due, now + kStepNs) : due);  // nothing to wait for: sleep it out
          continue;
        }
      } else {
        int64_t wake = scheduling ? std::min(due - kFineNs, next_progress) : next_progress;
        got = cq_.AsyncNext(&tag, &ok, DeadlineIn(wake - now));
      }
      if (got == grpc::CompletionQueue::SHUTDOWN) return;
      if (got != grpc::CompletionQueue::GOT_EVENT) continue;
      Complete(static_cast<Call*>(tag), ok);
      if (!open) {
        int64_t t = NowNs();
        if (t < end) Start(sends++, t, t);
      }
    }
  }

  const Records& records() const { return records_; }

 private:
  static std::shared_ptr<grpc::Channel> MakeChannel(const std::string& url) {
    // As worker_raw.CHANNEL_OPTIONS: no retries (a retried request would hide an error),
    // no proxy lookup, messages up to 256 MiB.
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_ENABLE_RETRIES, 0);
    args.SetInt(GRPC_ARG_ENABLE_HTTP_PROXY, 0);
    args.SetMaxReceiveMessageSize(256 << 20);
    args.SetMaxSendMessageSize(256 << 20);
    return grpc::CreateCustomChannel(url, grpc::InsecureChannelCredentials(), args);
  }

  // Sends payload `payload` (mod the count) with a deadline of timeout_s from now.
  void Start(uint64_t payload, int64_t sched_ns, int64_t sent_ns) {
    auto* call = new Call;
    call->sched_ns = sched_ns;
    call->sent_ns = sent_ns;
    call->context.set_deadline(DeadlineIn(static_cast<int64_t>(spec_.timeout_s * 1e9)));
    call->rpc = stub_.PrepareUnaryCall(&call->context, spec_.method, payloads_[payload % payloads_.size()], &cq_);
    call->rpc->StartCall();
    call->rpc->Finish(&call->response, &call->status, call);
    ++in_flight_;
  }

  void Complete(Call* call, bool ok) {
    int64_t done = NowNs();
    int8_t code = kClientError;
    std::string_view version;
    if (ok && !call->status.ok()) {
      code = static_cast<int8_t>(call->status.error_code());
    } else if (ok) {
      grpc::Slice single;
      if (call->response.TrySingleSlice(&single).ok()) {
        if (ResponseVersion({reinterpret_cast<const char*>(single.begin()), single.size()}, &version)) code = 0;
      } else {  // a large response in several slices: scan a contiguous copy
        std::vector<grpc::Slice> slices;
        scratch_.clear();
        if (call->response.Dump(&slices).ok()) {
          for (const grpc::Slice& s : slices) scratch_.append(reinterpret_cast<const char*>(s.begin()), s.size());
          if (ResponseVersion(scratch_, &version)) code = 0;
        }
      }
    }
    // `version` may point into `single`/`scratch_`; Add copies it before they go away.
    records_.Add(call->sched_ns, call->sent_ns, done, code, version);
    delete call;
    --in_flight_;
  }

  const Spec spec_;
  const std::vector<grpc::ByteBuffer> payloads_;  // the requests, used round-robin
  std::shared_ptr<grpc::Channel> channel_;        // one HTTP/2 connection to url
  grpc::GenericStub stub_;                        // calls `method` on channel_ with raw bytes
  grpc::CompletionQueue cq_;                      // every call's completion; polled by this thread only
  Records records_;
  int64_t in_flight_ = 0;  // calls started and not yet completed
  std::string scratch_;    // contiguous copy of a multi-slice response
};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: swapserve-loadgen SPEC.json PAYLOADS.bin OUT.bin (started by swapserve bench)\n";
    return 2;
  }
  signal(SIGPIPE, SIG_IGN);  // a runner that went away must not kill us mid-write
  Spec spec = ReadSpec(argv[1]);
  std::vector<grpc::ByteBuffer> payloads = ReadPayloads(argv[2]);
  const std::string out = argv[3];

  LoadGen gen(std::move(spec), std::move(payloads));
  gen.Warm();
  std::printf("ready\n");
  std::fflush(stdout);

  std::string line;
  if (!std::getline(std::cin, line)) return 1;
  line.erase(0, line.find_first_not_of(" \t\r"));
  line.erase(line.find_last_not_of(" \t\r") + 1);
  if (line.empty() || line == "abort") return 1;
  char* end = nullptr;
  long long start = std::strtoll(line.c_str(), &end, 10);
  if (*end != '\0') Fail("expected the start time in ns or \"abort\" on stdin, got: " + line);

  SleepUntil(start);
  double c0 = CpuSeconds();
  gen.Run(start);
  double cpu_s = CpuSeconds() - c0;
  WriteOutput(out, gen.records(), cpu_s);
  std::printf("done\n");
  std::fflush(stdout);
  return 0;
}
