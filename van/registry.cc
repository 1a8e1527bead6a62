#include "van/registry.h"

#ifdef MESHPOST_HAVE_CMA
#include "van/cma/cma_van.h"
#endif

namespace meshpost {

std::vector<std::string> CompiledTransports() {
  std::vector<std::string> names;
#ifdef MESHPOST_HAVE_CMA
  names.push_back("cma");
#endif
#ifdef MESHPOST_HAVE_RDMA
  names.push_back("rdma");
#endif
  names.push_back("tcp");
  return names;
}

bool IsSameHostTransport(const std::string& name) { return name == "cma"; }

Result<std::unique_ptr<Van>> CreateVan(const std::string& name, const VanOptions& options) {
  if (name == "tcp") return CreateZmqVan(options);
#ifdef MESHPOST_HAVE_CMA
  if (name == "cma") return CreateCmaVan(options);
#endif
  std::string have;
  for (const std::string& n : CompiledTransports()) have += (have.empty() ? "" : ", ") + n;
  return UnimplementedError("transport '" + name + "' is not built into this meshpost (have: " +
                            have + ")");
}

}  // namespace meshpost
