#include "common/env.h"

#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

namespace meshpost {

EnvLookup ProcessEnv() {
  return [](const char* name) -> const char* { return std::getenv(name); };
}

std::vector<std::string> ProcessEnvNames() {
  std::vector<std::string> names;
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    const char* eq = std::strchr(*e, '=');
    names.emplace_back(*e, eq == nullptr ? std::strlen(*e) : static_cast<size_t>(eq - *e));
  }
  return names;
}

Result<int64_t> ParseInt(const std::string& name, const std::string& value, int64_t min,
                         int64_t max) {
  const std::string expected =
      "expected an integer in [" + std::to_string(min) + ", " + std::to_string(max) + "]";
  if (value.empty()) return InvalidArgumentError(name + " is empty; " + expected);
  errno = 0;
  char* end = nullptr;
  long long v = std::strtoll(value.c_str(), &end, 10);
  if (errno != 0 || end == value.c_str() || *end != '\0') {
    return InvalidArgumentError(name + "='" + value + "' is not an integer; " + expected);
  }
  if (v < min || v > max) {
    return InvalidArgumentError(name + "=" + value + " is out of range; " + expected);
  }
  return static_cast<int64_t>(v);
}

Result<bool> ParseBool(const std::string& name, const std::string& value) {
  if (value == "1" || value == "true" || value == "True" || value == "TRUE" || value == "yes" ||
      value == "on") {
    return true;
  }
  if (value == "0" || value == "false" || value == "False" || value == "FALSE" || value == "no" ||
      value == "off" || value.empty()) {
    return false;
  }
  return InvalidArgumentError(name + "='" + value + "' is not a boolean; expected 0/1/true/false");
}

}  // namespace meshpost
