// Bounds-checked little-endian encoding for everything that crosses a process boundary.
// WireWriter appends fixed-width integers, strings and byte runs; WireReader decodes
// untrusted bytes and turns the first overrun or limit violation into a DataLoss status.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#include "common/status.h"

namespace meshpost {

class WireWriter {
 public:
  template <typename T>
  void Put(T v) {
    static_assert(std::is_integral_v<T> || std::is_enum_v<T>, "integers only");
    // The wire is little-endian; so is every host meshpost targets (x86-64, aarch64).
    char b[sizeof(T)];
    std::memcpy(b, &v, sizeof(T));
    buf_.append(b, sizeof(T));
  }
  void PutString(const std::string& s) {
    Put<uint32_t>(static_cast<uint32_t>(s.size()));
    buf_.append(s);
  }
  void PutBytes(const void* p, size_t n) { buf_.append(static_cast<const char*>(p), n); }
  std::string& buffer() { return buf_; }
  std::string Release() { return std::move(buf_); }
  size_t size() const { return buf_.size(); }

 private:
  std::string buf_;
};

class WireReader {
 public:
  WireReader(const void* data, size_t size) : p_(static_cast<const char*>(data)), end_(p_ + size) {}

  template <typename T>
  bool Get(T* out) {
    static_assert(std::is_integral_v<T> || std::is_enum_v<T>, "integers only");
    if (!Need(sizeof(T), "integer")) return false;
    std::memcpy(out, p_, sizeof(T));
    p_ += sizeof(T);
    return true;
  }
  // Strings longer than max_len are rejected rather than allocated.
  bool GetString(std::string* out, size_t max_len) {
    uint32_t n = 0;
    if (!Get(&n)) return false;
    if (n > max_len) {
      return Fail("string of " + std::to_string(n) + " bytes exceeds limit " +
                  std::to_string(max_len));
    }
    if (!Need(n, "string")) return false;
    out->assign(p_, n);
    p_ += n;
    return true;
  }
  bool Skip(size_t n) {
    if (!Need(n, "skip")) return false;
    p_ += n;
    return true;
  }
  bool Fail(const std::string& why) {
    if (status_.ok()) status_ = DataLossError(why);
    p_ = end_;
    return false;
  }
  size_t remaining() const { return static_cast<size_t>(end_ - p_); }
  bool ok() const { return status_.ok(); }
  const Status& status() const { return status_; }

 private:
  bool Need(size_t n, const char* what) {
    if (!status_.ok()) return false;
    if (static_cast<size_t>(end_ - p_) < n) {
      return Fail(std::string("truncated frame: needed ") + std::to_string(n) + " bytes for " +
                  what + ", " + std::to_string(end_ - p_) + " left");
    }
    return true;
  }
  const char* p_;
  const char* end_;
  Status status_;
};

}  // namespace meshpost
