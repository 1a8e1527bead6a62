// Validated parsing of launch variables. Each parser names the variable, the value it
// saw and what it expected; nothing here calls atoi or reads the environment by itself.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "common/result.h"

namespace meshpost {

// Looks a variable up; returns nullptr when unset. Tests pass a map-backed function.
using EnvLookup = std::function<const char*(const char*)>;
EnvLookup ProcessEnv();
// Names of every variable set in this process's environment.
std::vector<std::string> ProcessEnvNames();

Result<int64_t> ParseInt(const std::string& name, const std::string& value, int64_t min,
                         int64_t max);
Result<bool> ParseBool(const std::string& name, const std::string& value);

}  // namespace meshpost
