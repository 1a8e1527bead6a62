// Log levels as the launch variables name them (MESHPOST_LOG_LEVEL, PS_VERBOSE); kept
// apart from common/logging.h so option parsing needs no spdlog.
#pragma once

#include <string>

#include "common/result.h"

namespace meshpost {

enum class LogLevel { kUnset, kTrace, kDebug, kInfo, kWarn, kError, kOff };

const char* LogLevelName(LogLevel level);
// "trace", "debug", "info", "warn" (or "warning"), "error", "off"; case-insensitive.
Result<LogLevel> ParseLogLevel(const std::string& name, const std::string& value);
// StepMesh's PS_VERBOSE: 0 info, 1 debug, 2 and above trace.
LogLevel LogLevelFromVerbose(int verbose);

}  // namespace meshpost
