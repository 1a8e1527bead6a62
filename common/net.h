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

}  // namespace meshpost
