// Wire encoding of Meta. A frame is: magic "MPST", protocol version, flags, body length,
// then the fields (docs/wire_format.md). DecodeMeta treats its input as untrusted: every
// length, count, enum and size is checked, and malformed bytes give a DataLoss status.
#pragma once

#include <cstdint>
#include <string>

#include "common/result.h"
#include "van/message.h"

namespace meshpost {

constexpr uint32_t kWireMagic = 0x5453504D;  // "MPST" little-endian
constexpr uint16_t kWireVersion = 1;
constexpr size_t kWirePreambleBytes = 12;  // magic(4) version(2) flags(2) length(4)
constexpr size_t kMaxTensorsPerMessage = 4096;
constexpr size_t kMaxBodyBytes = 16u << 20;
constexpr uint64_t kMaxTensorBytes = 1ull << 40;

std::string EncodeMeta(const Meta& meta);
Result<Meta> DecodeMeta(const void* data, size_t size);

}  // namespace meshpost
