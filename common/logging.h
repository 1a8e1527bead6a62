// Internal logging: one spdlog logger per layer ("common", "tensor", "van", "ps"),
// every line prefixed with this process's role and rank. Not a public header.
//
// Cost: every MP_LOG_* first does one relaxed atomic load of the process-wide level and a
// branch. A disabled line (TRACE and DEBUG on the data path, by default) stops there: no
// lock, no logger lookup, no argument formatting. An enabled line finds its layer's logger
// once per call site (a function-local static), so it takes no registry lock either.
#pragma once

#include <spdlog/spdlog.h>

#include <atomic>
#include <memory>
#include <string>

#include "common/log_level.h"

namespace meshpost {

namespace log_internal {
// The most verbose level any logger accepts (spdlog::level values; lower = more verbose).
// Relaxed: a line racing with ConfigureLogging may use either level, which is harmless
// because each logger still applies its own level.
extern std::atomic<int> g_min_level;
inline bool Enabled(spdlog::level::level_enum level) {
  return static_cast<int>(level) >= g_min_level.load(std::memory_order_relaxed);
}
}  // namespace log_internal

// Returns the logger for a layer; created on first use with the current level. Loggers
// live for the whole process, so a reference stays valid.
spdlog::logger& Log(const char* layer);

// Sets the "role:rank" tag shown on every line and the level for all layers.
// verbose (StepMesh's PS_VERBOSE): 0 → info, 1 → debug, 2 and above → trace.
void ConfigureLogging(const std::string& role_tag, int verbose);
// Same with an explicit level (MESHPOST_LOG_LEVEL); kUnset keeps the current level.
void ConfigureLogging(const std::string& role_tag, LogLevel level);

}  // namespace meshpost

// `layer` must be the same at every execution of one call site (a literal or constant).
#define MP_LOG_AT_(layer, level, ...)                                   \
  do {                                                                  \
    if (::meshpost::log_internal::Enabled(level)) {                     \
      static ::spdlog::logger& mp_log_logger_ = ::meshpost::Log(layer); \
      mp_log_logger_.log(level, __VA_ARGS__);                           \
    }                                                                   \
  } while (0)

#define MP_LOG_INFO(layer, ...) MP_LOG_AT_(layer, ::spdlog::level::info, __VA_ARGS__)
#define MP_LOG_WARN(layer, ...) MP_LOG_AT_(layer, ::spdlog::level::warn, __VA_ARGS__)
#define MP_LOG_ERROR(layer, ...) MP_LOG_AT_(layer, ::spdlog::level::err, __VA_ARGS__)
#define MP_LOG_DEBUG(layer, ...) MP_LOG_AT_(layer, ::spdlog::level::debug, __VA_ARGS__)
#define MP_LOG_TRACE(layer, ...) MP_LOG_AT_(layer, ::spdlog::level::trace, __VA_ARGS__)
