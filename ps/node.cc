#include "ps/node.h"

#include "common/wire.h"

namespace meshpost {

std::string NodeInfo::Describe() const {
  return std::string(RoleName(role)) +
         (role == Role::kScheduler ? "" : " " + std::to_string(rank)) + " (node " +
         std::to_string(id) + " at " + host + ":" + std::to_string(port) + ", pid " +
         std::to_string(pid) + ")";
}

std::string EncodeNodes(const std::vector<NodeInfo>& nodes) {
  WireWriter w;
  w.Put<uint32_t>(static_cast<uint32_t>(nodes.size()));
  for (const NodeInfo& n : nodes) {
    w.Put<int32_t>(n.id);
    w.Put<uint8_t>(static_cast<uint8_t>(n.role));
    w.Put<int32_t>(n.rank);
    w.PutString(n.host);
    w.Put<int32_t>(n.port);
    w.Put<int32_t>(n.pid);
    w.PutString(n.host_identity);
    w.Put<uint32_t>(static_cast<uint32_t>(n.vans.size()));
    for (const auto& [name, endpoint] : n.vans) {
      w.PutString(name);
      w.PutString(endpoint);
    }
  }
  return w.Release();
}

Result<std::vector<NodeInfo>> DecodeNodes(const std::string& bytes) {
  WireReader r(bytes.data(), bytes.size());
  uint32_t n = 0;
  if (!r.Get(&n)) return r.status();
  if (n > 2 * 4096 + 1) return DataLossError("node table of " + std::to_string(n) + " nodes");
  std::vector<NodeInfo> nodes(n);
  for (NodeInfo& node : nodes) {
    uint8_t role = 0;
    r.Get(&node.id);
    r.Get(&role);
    r.Get(&node.rank);
    r.GetString(&node.host, 1024);
    r.Get(&node.port);
    r.Get(&node.pid);
    r.GetString(&node.host_identity, 1024);
    uint32_t nvans = 0;
    r.Get(&nvans);
    if (nvans > 16) return DataLossError("node offers " + std::to_string(nvans) + " transports");
    node.vans.resize(nvans);
    for (auto& [name, endpoint] : node.vans) {
      r.GetString(&name, 64);
      r.GetString(&endpoint, 4096);
    }
    if (!r.ok()) return r.status();
    if (role > static_cast<uint8_t>(Role::kWorker)) {
      return DataLossError("node table entry has invalid role " + std::to_string(role));
    }
    node.role = static_cast<Role>(role);
    if (node.port <= 0 || node.port > 65535) {
      return DataLossError("node table entry has invalid port " + std::to_string(node.port));
    }
  }
  if (r.remaining() != 0) return DataLossError("trailing bytes after node table");
  return nodes;
}

}  // namespace meshpost
