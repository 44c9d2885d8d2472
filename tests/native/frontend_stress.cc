// Stress for the native front end (csrc/frontend/frontend.cc), built by run_sanitizers.sh under
// ThreadSanitizer (data races, lock-order inversions) and AddressSanitizer (leaks, use after
// free) when grpc++ is installed.
//
//   frontend_stress [calls_per_mode=2000]
//
// For each mode (threaded, polled) a Frontend serves 127.0.0.1:0; four client threads send
// unary calls through grpc++'s generic stub, some with a deadline shorter than the answer takes
// (so cancellations race the answers), and one "event loop" thread drains events and finishes
// calls (polled: it also runs the queue in Poll, while Stop runs it too at the end). Every call
// must end OK with its payload echoed, or DEADLINE_EXCEEDED/CANCELLED for the short ones.
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <poll.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "frontend.h"

using swapserve::Status;
using swapserve::frontend::Event;
using swapserve::frontend::EventKind;
using swapserve::frontend::Frontend;
using swapserve::frontend::WriteResult;

namespace {

std::atomic<int> failures{0};

void Fail(const std::string& what) {
  std::fprintf(stderr, "FAIL: %s\n", what.c_str());
  failures.fetch_add(1);
}

grpc::ByteBuffer Buffer(const std::string& s) {
  grpc::Slice slice(s);
  return grpc::ByteBuffer(&slice, 1);
}

std::string Text(const grpc::ByteBuffer& b) {
  std::vector<grpc::Slice> slices;
  std::string out;
  if (!b.Dump(&slices).ok()) return out;
  for (auto& s : slices) out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return out;
}

void Client(int port, int calls, int seed) {
  auto channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials());
  grpc::GenericStub stub(channel);
  grpc::CompletionQueue cq;
  for (int i = 0; i < calls; ++i) {
    grpc::ClientContext ctx;
    const bool short_deadline = (i + seed) % 7 == 0;
    ctx.set_deadline(std::chrono::system_clock::now() +
                     (short_deadline ? std::chrono::microseconds(200) : std::chrono::microseconds(5000000)));
    const std::string payload = "call " + std::to_string(seed) + "/" + std::to_string(i);
    auto rpc = stub.PrepareUnaryCall(&ctx, "/stress.Echo/Call", Buffer(payload), &cq);
    rpc->StartCall();
    grpc::ByteBuffer response;
    grpc::Status status;
    rpc->Finish(&response, &status, reinterpret_cast<void*>(1));
    void* tag;
    bool ok;
    if (!cq.Next(&tag, &ok)) return Fail("client queue shut down");
    if (status.ok()) {
      if (Text(response) != payload) Fail("echo mismatch for " + payload);
    } else if (!(short_deadline && (status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED ||
                                    status.error_code() == grpc::StatusCode::CANCELLED))) {
      Fail(payload + ": status " + std::to_string(status.error_code()) + " " + status.error_message());
    }
  }
  cq.Shutdown();
  void* tag;
  bool ok;
  while (cq.Next(&tag, &ok)) {
  }
}

// The event loop's part: drain, answer (every third answer after a short pause, so deadlines
// and cancellations race it), until told to stop.
void Loop(Frontend* f, bool polled, std::atomic<bool>* stop) {
  int n = 0;
  while (!stop->load()) {
    if (polled) {
      f->Poll(0.002);
    } else {
      pollfd p{f->fd(), POLLIN, 0};
      ::poll(&p, 1, 2);
    }
    for (Event& e : f->Drain()) {
      if (e.kind != EventKind::kMessage) {
        f->Finish(e.call, static_cast<int>(grpc::StatusCode::CANCELLED), "cancelled", std::nullopt);
        continue;
      }
      if (++n % 3 == 0) std::this_thread::sleep_for(std::chrono::microseconds(300));
      f->Finish(e.call, 0, "", e.payload);
      f->Finish(e.call, 0, "", std::string("twice"));  // must be refused, not crash
    }
  }
}

void RunMode(bool polled, int calls) {
  std::unique_ptr<Frontend> f;
  Status st = Frontend::Create("127.0.0.1:0", 1 << 20, &f);
  if (!st.ok()) return Fail("Create: " + st.message());
  int port = 0;
  st = f->Start(polled, &port);
  if (!st.ok()) return Fail("Start: " + st.message());
  std::atomic<bool> stop{false};
  std::thread loop(Loop, f.get(), polled, &stop);
  std::vector<std::thread> clients;
  for (int t = 0; t < 4; ++t) clients.emplace_back(Client, port, calls / 4, t);
  for (auto& c : clients) c.join();
  // Stop while the loop still runs the queue (polled: two threads run it for a while).
  std::thread stopper([&] { f->Stop(0.05); });
  stopper.join();
  stop.store(true);
  loop.join();
  if (f->Write(1, "late") != WriteResult::kGone || f->Finish(1, 0, "", std::nullopt)) Fail("an operation after Stop was accepted");
  f.reset();
  std::printf("  %s: %d calls\n", polled ? "polled" : "threaded", calls);
}

}  // namespace

int main(int argc, char** argv) {
  int calls = argc > 1 ? std::atoi(argv[1]) : 2000;
  RunMode(false, calls);
  RunMode(true, calls);
  if (failures.load() != 0) {
    std::fprintf(stderr, "%d failures\n", failures.load());
    return 1;
  }
  std::printf("frontend stress ok\n");
  return 0;
}
