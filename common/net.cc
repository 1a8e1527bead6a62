#include "common/net.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <memory>

namespace meshpost {
namespace {

struct IfAddrsDeleter {
  void operator()(ifaddrs* p) const { freeifaddrs(p); }
};

}  // namespace

Result<std::string> InterfaceAddress(const std::string& interface) {
  ifaddrs* raw = nullptr;
  if (getifaddrs(&raw) != 0) return UnavailableError("getifaddrs failed");
  std::unique_ptr<ifaddrs, IfAddrsDeleter> list(raw);
  std::string seen;
  for (ifaddrs* a = raw; a != nullptr; a = a->ifa_next) {
    if (a->ifa_addr == nullptr || a->ifa_addr->sa_family != AF_INET) continue;
    char buf[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(a->ifa_addr)->sin_addr, buf, sizeof(buf));
    if (interface == a->ifa_name) return std::string(buf);
    seen += (seen.empty() ? "" : ", ") + std::string(a->ifa_name) + "=" + buf;
  }
  return InvalidArgumentError("DMLC_INTERFACE='" + interface +
                              "' has no IPv4 address on this host; interfaces: " + seen);
}

std::string DefaultHostAddress() {
  ifaddrs* raw = nullptr;
  if (getifaddrs(&raw) != 0) return "127.0.0.1";
  std::unique_ptr<ifaddrs, IfAddrsDeleter> list(raw);
  for (ifaddrs* a = raw; a != nullptr; a = a->ifa_next) {
    if (a->ifa_addr == nullptr || a->ifa_addr->sa_family != AF_INET) continue;
    if (a->ifa_flags & IFF_LOOPBACK) continue;
    if (!(a->ifa_flags & IFF_UP)) continue;
    char buf[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(a->ifa_addr)->sin_addr, buf, sizeof(buf));
    return buf;
  }
  return "127.0.0.1";
}

std::string HostName() {
  char buf[256] = {0};
  gethostname(buf, sizeof(buf) - 1);
  return buf;
}

std::string HostIdentity() {
  std::string boot_id;
  std::ifstream f("/proc/sys/kernel/random/boot_id");
  std::getline(f, boot_id);
  return HostName() + "/" + boot_id;
}

namespace {

std::string LocalAddresses() {
  ifaddrs* raw = nullptr;
  if (getifaddrs(&raw) != 0) return "(unknown)";
  std::unique_ptr<ifaddrs, IfAddrsDeleter> list(raw);
  std::string out;
  for (ifaddrs* a = raw; a != nullptr; a = a->ifa_next) {
    if (a->ifa_addr == nullptr || a->ifa_addr->sa_family != AF_INET) continue;
    char buf[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(a->ifa_addr)->sin_addr, buf, sizeof(buf));
    out += (out.empty() ? "" : ", ") + std::string(a->ifa_name) + "=" + buf;
  }
  return out;
}

}  // namespace

Result<std::string> ResolveIPv4(const std::string& host, const std::string& what) {
  if (host.empty())
    return InvalidArgumentError(what + " is empty; expected a host name or IPv4 address");
  in_addr numeric{};
  if (inet_pton(AF_INET, host.c_str(), &numeric) == 1) return host;
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  const int rc = getaddrinfo(host.c_str(), nullptr, &hints, &res);
  if (rc != 0 || res == nullptr) {
    return InvalidArgumentError(what + "='" + host + "' does not resolve to an IPv4 address (" +
                                (rc != 0 ? gai_strerror(rc) : "no address") + ")");
  }
  char buf[INET_ADDRSTRLEN];
  inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(res->ai_addr)->sin_addr, buf, sizeof(buf));
  freeaddrinfo(res);
  return std::string(buf);
}

Status CheckBindable(const std::string& ip, const std::string& what) {
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = 0;
  if (inet_pton(AF_INET, ip.c_str(), &addr.sin_addr) != 1) {
    return InvalidArgumentError(what + "='" + ip + "' is not an IPv4 address");
  }
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return UnavailableError(what + ": socket: " + std::strerror(errno));
  const int rc = ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  const int err = errno;
  ::close(fd);
  if (rc != 0) {
    return InvalidArgumentError(what + "='" + ip + "' is not an address this host can listen on (" +
                                std::strerror(err) + "); this host has: " + LocalAddresses());
  }
  return OkStatus();
}

Status CheckWritableFd(int fd, const std::string& what) {
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0) {
    return InvalidArgumentError(what + "=" + std::to_string(fd) +
                                " is not an open file descriptor in this process (" +
                                std::strerror(errno) +
                                "); expected the write end of a pipe "
                                "inherited from the launcher");
  }
  if ((flags & O_ACCMODE) == O_RDONLY) {
    return InvalidArgumentError(what + "=" + std::to_string(fd) +
                                " is open read-only; expected a descriptor to write the port to");
  }
  return OkStatus();
}

bool IsLoopbackHost(const std::string& host) {
  return host.rfind("127.", 0) == 0 || host == "localhost" || host == "::1";
}

}  // namespace meshpost
