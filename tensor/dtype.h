// Element types and devices meshpost moves. The numeric values of DType are part of the
// wire format (see docs/wire_format.md): never renumber, only append.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace meshpost {

enum class DType : uint8_t {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
  kFloat64 = 3,
  kInt8 = 4,
  kUInt8 = 5,
  kInt16 = 6,
  kInt32 = 7,
  kInt64 = 8,
  kBool = 9,
  kFloat8E4M3 = 10,
  kFloat8E5M2 = 11,
};
constexpr int kNumDTypes = 12;

bool IsValidDType(int value);
size_t DTypeSize(DType dtype);
const char* DTypeName(DType dtype);

enum class DeviceType : uint8_t { kCPU = 0, kCUDA = 1 };

struct Device {
  DeviceType type = DeviceType::kCPU;
  int index = 0;
  bool operator==(const Device& o) const { return type == o.type && index == o.index; }
  std::string ToString() const;
};

}  // namespace meshpost
