// Internal logging: one spdlog logger per layer ("common", "tensor", "van", "ps"),
// every line prefixed with this process's role and rank. Not a public header.
#pragma once

#include <spdlog/spdlog.h>

#include <memory>
#include <string>

#include "common/log_level.h"

namespace meshpost {

// Returns the logger for a layer; created on first use with the current level.
spdlog::logger& Log(const char* layer);

// Sets the "role:rank" tag shown on every line and the level for all layers.
// verbose (StepMesh's PS_VERBOSE): 0 → info, 1 → debug, 2 and above → trace.
void ConfigureLogging(const std::string& role_tag, int verbose);
// Same with an explicit level (MESHPOST_LOG_LEVEL); kUnset keeps the current level.
void ConfigureLogging(const std::string& role_tag, LogLevel level);

}  // namespace meshpost

#define MP_LOG_INFO(layer, ...) ::meshpost::Log(layer).info(__VA_ARGS__)
#define MP_LOG_WARN(layer, ...) ::meshpost::Log(layer).warn(__VA_ARGS__)
#define MP_LOG_ERROR(layer, ...) ::meshpost::Log(layer).error(__VA_ARGS__)
#define MP_LOG_DEBUG(layer, ...) ::meshpost::Log(layer).debug(__VA_ARGS__)
#define MP_LOG_TRACE(layer, ...) ::meshpost::Log(layer).trace(__VA_ARGS__)
