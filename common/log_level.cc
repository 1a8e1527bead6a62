#include "common/log_level.h"

#include <algorithm>
#include <cctype>

namespace meshpost {

const char* LogLevelName(LogLevel level) {
  switch (level) {
    case LogLevel::kUnset: return "unset";
    case LogLevel::kTrace: return "trace";
    case LogLevel::kDebug: return "debug";
    case LogLevel::kInfo: return "info";
    case LogLevel::kWarn: return "warn";
    case LogLevel::kError: return "error";
    case LogLevel::kOff: return "off";
  }
  return "unset";
}

Result<LogLevel> ParseLogLevel(const std::string& name, const std::string& value) {
  std::string v = value;
  std::transform(v.begin(), v.end(), v.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  if (v == "trace") return LogLevel::kTrace;
  if (v == "debug") return LogLevel::kDebug;
  if (v == "info") return LogLevel::kInfo;
  if (v == "warn" || v == "warning") return LogLevel::kWarn;
  if (v == "error") return LogLevel::kError;
  if (v == "off") return LogLevel::kOff;
  return InvalidArgumentError(name + "='" + value +
                              "' is not a log level; expected trace, debug, info, warn, error "
                              "or off");
}

LogLevel LogLevelFromVerbose(int verbose) {
  if (verbose >= 2) return LogLevel::kTrace;
  if (verbose == 1) return LogLevel::kDebug;
  return LogLevel::kInfo;
}

}  // namespace meshpost
