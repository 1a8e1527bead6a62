// Host networking helpers: the IPv4 address of an interface, a default address to
// advertise, and this host's identity (hostname + boot id) for same-host detection.
#pragma once

#include <string>

#include "common/result.h"

namespace meshpost {

// IPv4 address of `interface` (e.g. "eth0"); the error lists the interfaces that exist.
Result<std::string> InterfaceAddress(const std::string& interface);
// First non-loopback IPv4 address, or 127.0.0.1 when there is none.
std::string DefaultHostAddress();
std::string HostName();
// hostname + kernel boot id: equal only for processes on the same running kernel.
std::string HostIdentity();

// Launch checks that fail at once instead of after a start timeout. `what` names the
// variable the value came from (e.g. "DMLC_PS_ROOT_URI") and appears in every error.
// The IPv4 address `host` (a name or a dotted quad) resolves to.
Result<std::string> ResolveIPv4(const std::string& host, const std::string& what);
// Whether this host can listen on `ip` (one of its own addresses, or 0.0.0.0).
Status CheckBindable(const std::string& ip, const std::string& what);
// Whether `fd` is an open descriptor this process may write to.
Status CheckWritableFd(int fd, const std::string& what);
// 127.0.0.0/8, ::1 and "localhost".
bool IsLoopbackHost(const std::string& host);

}  // namespace meshpost
