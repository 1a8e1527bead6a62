// Environment parsing and device probing for the RDMA van.
#include <string>

#include "van/rdma/rdma_transport.h"
#include "van/rdma/rdma_van.h"

namespace meshpost {
namespace {

Status ReadInt(const EnvLookup& env, const char* name, int64_t min, int64_t max, int64_t* out) {
  const char* v = env(name);
  if (v == nullptr || *v == '\0') return OkStatus();
  MESHPOST_ASSIGN_OR_RETURN(*out, ParseInt(name, v, min, max));
  return OkStatus();
}

}  // namespace

Result<RdmaOptions> RdmaOptionsFromEnv(const EnvLookup& env) {
  RdmaOptions o;
  if (const char* v = env("MESHPOST_RDMA_DEVICE")) o.device = v;
  if (const char* v = env("DMLC_INTERFACE")) o.interface = v;
  // "mlx5_0:2" selects port 2, the form ibv_devinfo users often paste.
  if (auto colon = o.device.find(':'); colon != std::string::npos) {
    MESHPOST_ASSIGN_OR_RETURN(
        int64_t port, ParseInt("MESHPOST_RDMA_DEVICE port", o.device.substr(colon + 1), 1, 255));
    o.port = static_cast<int>(port);
    o.device.resize(colon);
  }
  int64_t port = o.port, gid = o.gid_index, inl = o.max_inline, slots = o.header_slots,
          bytes = o.header_slot_bytes, cache = static_cast<int64_t>(o.mr_cache_entries);
  MESHPOST_RETURN_IF_ERROR(ReadInt(env, "MESHPOST_RDMA_PORT", 1, 255, &port));
  MESHPOST_RETURN_IF_ERROR(ReadInt(env, "MESHPOST_RDMA_GID_INDEX", -1, 1023, &gid));
  MESHPOST_RETURN_IF_ERROR(ReadInt(env, "MESHPOST_RDMA_INLINE", 0, 4096, &inl));
  MESHPOST_RETURN_IF_ERROR(
      ReadInt(env, "MESHPOST_RDMA_HEADER_SLOTS", 1, rdma::kMaxHeaderSlots, &slots));
  MESHPOST_RETURN_IF_ERROR(
      ReadInt(env, "MESHPOST_RDMA_HEADER_BYTES", rdma::kMinSlotBytes, rdma::kMaxSlotBytes, &bytes));
  MESHPOST_RETURN_IF_ERROR(ReadInt(env, "MESHPOST_RDMA_MR_CACHE", 1, 1 << 20, &cache));
  o.port = static_cast<int>(port);
  o.gid_index = static_cast<int>(gid);
  o.max_inline = static_cast<uint32_t>(inl);
  o.header_slots = static_cast<uint32_t>(slots);
  o.header_slot_bytes = static_cast<uint32_t>(bytes);
  o.mr_cache_entries = static_cast<size_t>(cache);
  if (const char* v = env("MESHPOST_RDMA_GPU"); v != nullptr && *v != '\0') {
    MESHPOST_RETURN_IF_ERROR(rdma::ParseGpuRegistration("MESHPOST_RDMA_GPU", v).status());
    o.gpu = v;
  }
  return o;
}

Result<std::vector<RdmaDeviceInfo>> ProbeRdmaDevices() {
  auto api = rdma::CreateIbverbsApi();
  MESHPOST_ASSIGN_OR_RETURN(std::vector<std::string> names, api->ListDevices());
  std::vector<RdmaDeviceInfo> out;
  for (const auto& name : names) {
    RdmaDeviceInfo info;
    info.name = name;
    auto dev = api->OpenDevice(name);
    if (!dev.ok()) {
      out.push_back(info);  // listed but not openable (permissions): still report it
      continue;
    }
    auto attr = (*dev)->QueryDevice();
    if (!attr.ok()) {
      out.push_back(info);
      continue;
    }
    info.node_guid = attr->node_guid;
    for (int p = 1; p <= attr->phys_port_cnt; ++p) {
      auto pa = (*dev)->QueryPort(static_cast<uint8_t>(p));
      if (!pa.ok()) continue;
      RdmaPortInfo port;
      port.port = p;
      port.state = pa->state;
      port.link_layer = rdma::LinkLayerName(pa->link_layer);
      port.lid = pa->lid;
      port.active_mtu = static_cast<int>(pa->active_mtu_bytes);
      for (int g = 0; g < std::min(pa->gid_tbl_len, 256); ++g) {
        auto e = (*dev)->QueryGid(static_cast<uint8_t>(p), g);
        if (!e.ok() || rdma::GidIsZero(e->gid)) continue;
        port.gids.push_back({g, rdma::GidToString(e->gid),
                             e->type == rdma::GidType::kRoceV2 ? "RoCE v2" : "IB/RoCE v1",
                             e->netdev});
      }
      info.ports.push_back(std::move(port));
    }
    out.push_back(std::move(info));
  }
  return out;
}

Status CheckRdmaAvailable(const RdmaOptions& options) {
  auto api = rdma::CreateIbverbsApi();
  MESHPOST_ASSIGN_OR_RETURN(std::string name, rdma::SelectDevice(api.get(), options));
  MESHPOST_ASSIGN_OR_RETURN(auto device, api->OpenDevice(name));
  auto port = rdma::SelectPort(device.get(), options);
  return port.ok() ? OkStatus() : port.status();
}

}  // namespace meshpost
