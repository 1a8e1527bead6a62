#include "common/net.h"

#include <arpa/inet.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netinet/in.h>
#include <unistd.h>

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

}  // namespace meshpost
