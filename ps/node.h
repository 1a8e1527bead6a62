// A node's identity and address as exchanged at rendezvous, and the wire encoding of a
// single node (REGISTER) and of the node table (NODE_TABLE). Decoding is bounds-checked.
#pragma once

#include <string>
#include <vector>

#include "common/result.h"
#include "ps/options.h"

namespace meshpost {

struct NodeInfo {
  int id = -1;
  Role role = Role::kWorker;
  int rank = 0;
  std::string host;
  int port = 0;
  int pid = 0;
  std::string host_identity;  // hostname + boot id (same-host detection)
  // Data transports this node offers beyond tcp: (name, van endpoint) pairs.
  std::vector<std::pair<std::string, std::string>> vans;

  std::string Describe() const;  // "server 1 (node 2 at 10.0.0.3:4567, pid 99)"
};

std::string EncodeNodes(const std::vector<NodeInfo>& nodes);
Result<std::vector<NodeInfo>> DecodeNodes(const std::string& bytes);

}  // namespace meshpost
