// Status: the only error channel inside the native core (no C++ exceptions).
//
// Codes map one-to-one onto swapserve.errors in bindings.cc (the only place that
// turns a Status into a Python exception):
//   kInvalidArgument    -> InvalidInput        (INVALID_ARGUMENT)
//   kFailedPrecondition -> FailedPrecondition  (FAILED_PRECONDITION), e.g. stale publish
//   kNotFound           -> ModelNotFound       (NOT_FOUND)
//   kResourceExhausted  -> ResourceExhausted   (RESOURCE_EXHAUSTED), e.g. queue full
//   kUnavailable        -> VersionNotReady     (UNAVAILABLE), e.g. batcher closed
//   kInternal           -> SwapserveError      (INTERNAL)
#pragma once

#include <string>
#include <utility>

namespace swapserve {

enum class StatusCode : int {
  kOk = 0,
  kInvalidArgument = 1,
  kFailedPrecondition = 2,
  kNotFound = 3,
  kResourceExhausted = 4,
  kUnavailable = 5,
  kInternal = 6,
};

class Status {
 public:
  Status() = default;  // OK
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status Ok() { return Status(); }
  static Status InvalidArgument(std::string m) { return {StatusCode::kInvalidArgument, std::move(m)}; }
  static Status FailedPrecondition(std::string m) { return {StatusCode::kFailedPrecondition, std::move(m)}; }
  static Status NotFound(std::string m) { return {StatusCode::kNotFound, std::move(m)}; }
  static Status ResourceExhausted(std::string m) { return {StatusCode::kResourceExhausted, std::move(m)}; }
  static Status Unavailable(std::string m) { return {StatusCode::kUnavailable, std::move(m)}; }
  static Status Internal(std::string m) { return {StatusCode::kInternal, std::move(m)}; }

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }

 private:
  StatusCode code_ = StatusCode::kOk;  // kOk unless an error was constructed
  std::string message_;                // human-readable: names the model/version and the fix
};

}  // namespace swapserve

// Propagate a non-OK Status to the caller.
#define SWAPSERVE_RETURN_IF_ERROR(expr)          \
  do {                                           \
    ::swapserve::Status _st = (expr);            \
    if (!_st.ok()) return _st;                   \
  } while (0)
