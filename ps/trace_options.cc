#include "ps/trace_options.h"

namespace meshpost {

const char* TraceModeName(TraceOptions::Mode mode) {
  switch (mode) {
    case TraceOptions::Mode::kOff: return "off";
    case TraceOptions::Mode::kSample: return "sample";
    case TraceOptions::Mode::kAll: return "all";
    case TraceOptions::Mode::kAlternate: return "alternate";
  }
  return "unknown";
}

Status ParseTraceMode(const std::string& name, const std::string& value, TraceOptions* out) {
  if (value == "off" || value == "0" || value.empty()) {
    out->mode = TraceOptions::Mode::kOff;
    out->sample_every = 1;
    return OkStatus();
  }
  if (value == "all" || value == "1") {
    out->mode = TraceOptions::Mode::kAll;
    out->sample_every = 1;
    return OkStatus();
  }
  const std::string prefix = "sample:";
  if (value.compare(0, prefix.size(), prefix) == 0) {
    auto n = ParseInt(name + " (N of sample:N)", value.substr(prefix.size()), 1, 1000000000);
    if (!n.ok()) return n.status();
    out->mode = *n == 1 ? TraceOptions::Mode::kAll : TraceOptions::Mode::kSample;
    out->sample_every = static_cast<uint32_t>(*n);
    return OkStatus();
  }
  const std::string alternate = "alternate:";
  if (value.compare(0, alternate.size(), alternate) == 0) {
    auto n = ParseInt(name + " (N of alternate:N)", value.substr(alternate.size()), 1, 1000000000);
    if (!n.ok()) return n.status();
    out->mode = TraceOptions::Mode::kAlternate;
    out->sample_every = static_cast<uint32_t>(*n);
    return OkStatus();
  }
  return InvalidArgumentError(name + "='" + value +
                              "'; expected off, all, sample:N (capture about one request in "
                              "N) or alternate:N (alternating blocks of N handle ids, for "
                              "overhead A/B runs)");
}

Status ReadTraceOptions(const EnvLookup& env, TraceOptions* out) {
  if (const char* v = env("MESHPOST_TRACE")) {
    MESHPOST_RETURN_IF_ERROR(ParseTraceMode("MESHPOST_TRACE", v, out));
  }
  if (const char* v = env("MESHPOST_TRACE_DIR")) out->dir = v;
  if (const char* v = env("MESHPOST_TRACE_FILE_MB")) {
    auto mb = ParseInt("MESHPOST_TRACE_FILE_MB", v, 1, 1 << 20);
    if (!mb.ok()) return mb.status();
    out->max_file_bytes = static_cast<uint64_t>(*mb) << 20;
  }
  if (const char* v = env("MESHPOST_TRACE_MAX_FILES")) {
    auto n = ParseInt("MESHPOST_TRACE_MAX_FILES", v, 1, 100000);
    if (!n.ok()) return n.status();
    out->max_files = static_cast<int>(*n);
  }
  if (const char* v = env("MESHPOST_TRACE_RING")) {
    auto n = ParseInt("MESHPOST_TRACE_RING", v, 16, 1 << 24);
    if (!n.ok()) return n.status();
    out->ring_records = static_cast<uint32_t>(*n);
  }
  return OkStatus();
}

Status ValidateTraceOptions(const TraceOptions& t) {
  auto bad = [](const std::string& field, const std::string& value, const std::string& want) {
    return InvalidArgumentError("option " + field + "=" + value + " is invalid; expected " + want);
  };
  if ((t.mode == TraceOptions::Mode::kSample || t.mode == TraceOptions::Mode::kAlternate) &&
      t.sample_every < 1) {
    return bad("trace (MESHPOST_TRACE)", "sample:0", "sample:N with N >= 1");
  }
  if (t.enabled() && t.dir.empty()) {
    return bad("trace_dir (MESHPOST_TRACE_DIR)", "''",
               std::string("a directory for the trace files when MESHPOST_TRACE=") +
                   TraceModeName(t.mode));
  }
  if (t.max_file_bytes < (1ull << 20)) {
    return bad("trace_file_mb (MESHPOST_TRACE_FILE_MB)", std::to_string(t.max_file_bytes >> 20),
               ">= 1");
  }
  if (t.max_files < 1) {
    return bad("trace_max_files (MESHPOST_TRACE_MAX_FILES)", std::to_string(t.max_files), ">= 1");
  }
  if (t.ring_records < 16 || t.ring_records > (1u << 24)) {
    return bad("trace_ring (MESHPOST_TRACE_RING)", std::to_string(t.ring_records),
               "16..16777216 records");
  }
  return OkStatus();
}

}  // namespace meshpost
