#include "common/logging.h"

#include <spdlog/sinks/stdout_color_sinks.h>

#include <cstdlib>
#include <mutex>
#include <unordered_map>

namespace meshpost {
namespace {

spdlog::level::level_enum ToSpdlog(LogLevel level) {
  switch (level) {
    case LogLevel::kTrace: return spdlog::level::trace;
    case LogLevel::kDebug: return spdlog::level::debug;
    case LogLevel::kUnset:
    case LogLevel::kInfo: return spdlog::level::info;
    case LogLevel::kWarn: return spdlog::level::warn;
    case LogLevel::kError: return spdlog::level::err;
    case LogLevel::kOff: return spdlog::level::off;
  }
  return spdlog::level::info;
}

// Lines logged before ConfigureLogging (option parsing) follow the variables too.
spdlog::level::level_enum LevelFromEnv() {
  spdlog::level::level_enum level = spdlog::level::info;
  if (const char* v = std::getenv("PS_VERBOSE")) {
    level = ToSpdlog(LogLevelFromVerbose(static_cast<int>(std::strtol(v, nullptr, 10))));
  }
  if (const char* v = std::getenv("MESHPOST_LOG_LEVEL")) {
    auto parsed = ParseLogLevel("MESHPOST_LOG_LEVEL", v);
    if (parsed.ok()) level = ToSpdlog(*parsed);
  }
  return level;
}

// Logging is process-wide by nature (one stderr); this is the one registry of loggers.
// Its mutex is taken only to create a logger or to reconfigure, never per line.
struct LogState {
  std::mutex mu;
  std::string tag = "meshpost";
  spdlog::level::level_enum level = LevelFromEnv();
  std::shared_ptr<spdlog::sinks::sink> sink;
  std::unordered_map<std::string, std::shared_ptr<spdlog::logger>> loggers;
};

LogState& State() {
  static LogState* state = [] {
    auto* s = new LogState();
    s->sink = std::make_shared<spdlog::sinks::stderr_color_sink_mt>();
    return s;
  }();
  return *state;
}

void ApplyPattern(spdlog::logger& l, const std::string& tag) {
  l.set_pattern("[%H:%M:%S.%f] [" + tag + "] [%n] [%l] %v");
}

}  // namespace

namespace log_internal {
// Zero (trace) until this initializer runs, so lines logged by other static initializers
// reach their logger, whose own level filters them.
std::atomic<int> g_min_level{static_cast<int>(LevelFromEnv())};
}  // namespace log_internal

spdlog::logger& Log(const char* layer) {
  LogState& s = State();
  std::lock_guard<std::mutex> lock(s.mu);
  auto it = s.loggers.find(layer);
  if (it != s.loggers.end()) return *it->second;
  auto logger = std::make_shared<spdlog::logger>(layer, s.sink);
  logger->set_level(s.level);
  ApplyPattern(*logger, s.tag);
  logger->flush_on(spdlog::level::warn);
  s.loggers.emplace(layer, logger);
  return *logger;
}

void ConfigureLogging(const std::string& role_tag, int verbose) {
  ConfigureLogging(role_tag, LogLevelFromVerbose(verbose));
}

void ConfigureLogging(const std::string& role_tag, LogLevel level) {
  LogState& s = State();
  std::lock_guard<std::mutex> lock(s.mu);
  s.tag = role_tag;
  if (level != LogLevel::kUnset) s.level = ToSpdlog(level);
  for (auto& [name, logger] : s.loggers) {
    logger->set_level(s.level);
    ApplyPattern(*logger, s.tag);
  }
  log_internal::g_min_level.store(static_cast<int>(s.level), std::memory_order_relaxed);
}

}  // namespace meshpost
