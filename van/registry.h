// Transport registry: which vans this build has and how to create one by name. ps/ picks
// a van per peer pair from these names (same host > rdma > tcp) and never includes a
// concrete van's header.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "common/result.h"
#include "van/van.h"

namespace meshpost {

// Data transports compiled into this build, highest priority first; "tcp" is always last.
std::vector<std::string> CompiledTransports();
// Creates the named van; Unimplemented when not compiled in, Unavailable when the host
// cannot run it (e.g. "rdma" without a device), with a message that says why.
Result<std::unique_ptr<Van>> CreateVan(const std::string& name, const VanOptions& options);
// Whether the named transport only connects processes on the same host.
bool IsSameHostTransport(const std::string& name);

}  // namespace meshpost
