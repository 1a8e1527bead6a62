// The transport table. This file is compiled into its own target (meshpost_van_registry),
// which links every van target this build has, so a van in an optional target (rdma) is
// named here and reachable by name without self-registering objects, which a static
// link would drop.
#include "van/registry.h"

#include "van/cma/cma_van.h"
#include "van/zmq/zmq_van.h"
#ifdef MESHPOST_HAVE_RDMA
#include "van/rdma/rdma_van.h"
#endif

namespace meshpost {
namespace {

using Factory = Result<std::unique_ptr<Van>> (*)(const VanOptions&);

struct Entry {
  TransportInfo info;
  Factory create;  // nullptr when not compiled in
};

Result<std::unique_ptr<Van>> MakeCma(const VanOptions& o) { return CreateCmaVan(o); }
Result<std::unique_ptr<Van>> MakeTcp(const VanOptions& o) { return CreateZmqVan(o); }

#ifdef MESHPOST_HAVE_RDMA
Result<std::unique_ptr<Van>> MakeRdma(const VanOptions& o) {
  MESHPOST_ASSIGN_OR_RETURN(RdmaOptions ro, RdmaOptionsFromEnv(o.env ? o.env : ProcessEnv()));
  if (ro.interface.empty()) ro.interface = o.interface;
  ro.wait = o.wait;
  ro.stop_drain_ms = o.stop_drain_ms;
  ro.pinner = o.pinner;
  ro.gpu_backend = o.device_backend;
  MESHPOST_ASSIGN_OR_RETURN(auto van, CreateRdmaVan(ro));
  return std::unique_ptr<Van>(std::move(van));
}
constexpr Factory kRdmaFactory = &MakeRdma;
constexpr bool kRdmaBuilt = true;
#else
constexpr Factory kRdmaFactory = nullptr;
constexpr bool kRdmaBuilt = false;
#endif

// Priority order: the first van that both ends offer and that can reach the peer carries
// the pair's data.
const std::vector<Entry>& Table() {
  static const std::vector<Entry> table = {
      {{"cma", "same host: cross-memory attach, shared-memory fallback", true}, &MakeCma},
      {{"rdma", "RDMA (libibverbs RC queue pairs)", kRdmaBuilt}, kRdmaFactory},
      {{"tcp", "ZeroMQ over TCP, any two hosts", true}, &MakeTcp},
  };
  return table;
}

}  // namespace

const std::vector<TransportInfo>& KnownTransports() {
  static const std::vector<TransportInfo> infos = [] {
    std::vector<TransportInfo> v;
    for (const Entry& e : Table()) v.push_back(e.info);
    return v;
  }();
  return infos;
}

std::vector<std::string> CompiledTransports() {
  std::vector<std::string> names;
  for (const Entry& e : Table()) {
    if (e.info.compiled) names.emplace_back(e.info.name);
  }
  return names;
}

std::string KnownTransportNames() {
  std::string s;
  const auto& table = Table();
  for (size_t i = 0; i < table.size(); ++i) {
    if (i > 0) s += i + 1 == table.size() ? " or " : ", ";
    s += table[i].info.name;
  }
  return s;
}

bool IsKnownTransport(const std::string& name) {
  for (const Entry& e : Table()) {
    if (name == e.info.name) return true;
  }
  return false;
}

Result<std::unique_ptr<Van>> CreateVan(const std::string& name, const VanOptions& options) {
  for (const Entry& e : Table()) {
    if (name != e.info.name) continue;
    if (e.create == nullptr) {
      std::string have;
      for (const std::string& n : CompiledTransports()) have += (have.empty() ? "" : ", ") + n;
      return UnimplementedError("transport '" + name +
                                "' is not built into this meshpost (have: " + have +
                                (name == "rdma" ? "; configure with -DMESHPOST_WITH_RDMA=ON and "
                                                  "libibverbs-dev installed)"
                                                : ")"));
    }
    return e.create(options);
  }
  return InvalidArgumentError("CreateVan: transport '" + name + "' is unknown; expected " +
                              KnownTransportNames());
}

}  // namespace meshpost
