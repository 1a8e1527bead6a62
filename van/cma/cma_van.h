// Same-host van: a unix-socket doorbell plus one-copy payload moves. The receiver pulls
// each data segment with process_vm_readv from the sender's memory straight into the
// destination its own VanReceiver::Destination chose; where CMA is refused it falls back
// to a shared-memory staging copy (decided per peer at Connect, logged once at info).
// Peers must run on the same kernel (compare HostIdentity()); see docs/performance.md.
#pragma once

#include <memory>

#include "van/van.h"

namespace meshpost {

// name() is "cma"; endpoint() (valid after Bind) is what peers pass in
// PeerAddress::endpoint. Bind ignores host/port and returns 0 (no TCP port is used).
std::unique_ptr<Van> CreateCmaVan(const VanOptions& options);

}  // namespace meshpost
