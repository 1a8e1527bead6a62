// Transport registry: the one table of transports meshpost knows (names, priority, what
// they need) and how to create one by name. ps/ picks a van per peer pair from this table
// (highest priority first, the first van that can reach the peer wins) and never includes
// a concrete van's header. Python's meshpost.transports(), option validation and error
// messages all read this table.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/result.h"
#include "van/van.h"

namespace meshpost {

struct TransportInfo {
  const char* name;         // "cma", "rdma", "tcp"
  const char* description;  // one line for docs and error messages
  bool compiled;            // built into this binary
};

// Every transport meshpost knows, highest priority first; "tcp" is always last and always
// compiled. Transports not compiled in are listed (compiled = false) so errors can say so.
const std::vector<TransportInfo>& KnownTransports();
// Names of the compiled transports, highest priority first.
std::vector<std::string> CompiledTransports();
// "cma, rdma or tcp": for error messages about a transport name.
std::string KnownTransportNames();
bool IsKnownTransport(const std::string& name);

// Creates the named van; InvalidArgument for an unknown name, Unimplemented when known but
// not compiled in, Unavailable when the host cannot run it (e.g. "rdma" without a device),
// with a message that says why.
Result<std::unique_ptr<Van>> CreateVan(const std::string& name, const VanOptions& options);

// Something that creates vans by name, CreateVan by default. Owners take one so tests can
// inject vans (e.g. RDMA over an in-process fake fabric) without a hook in any options.
using VanFactory =
    std::function<Result<std::unique_ptr<Van>>(const std::string& name, const VanOptions&)>;

}  // namespace meshpost
