#include "ps/cluster.h"

#include "ps/node_context.h"

namespace meshpost {

int GroupOf(Role role) {
  switch (role) {
    case Role::kScheduler: return kSchedulerGroup;
    case Role::kServer: return kServerGroup;
    case Role::kWorker: return kWorkerGroup;
  }
  return 0;
}

std::string GroupNames(int mask) {
  std::string s;
  if (mask & kSchedulerGroup) s += "scheduler";
  if (mask & kServerGroup) s += std::string(s.empty() ? "" : "+") + "servers";
  if (mask & kWorkerGroup) s += std::string(s.empty() ? "" : "+") + "workers";
  return s;
}

bool IsDataPeer(Role self, Role other) {
  return (self == Role::kWorker && other == Role::kServer) ||
         (self == Role::kServer && other == Role::kWorker);
}

Role ClusterLayout::RoleOf(int id) const {
  if (id == kSchedulerId) return Role::kScheduler;
  return id <= num_servers_ ? Role::kServer : Role::kWorker;
}

std::string ClusterLayout::Describe(int id) const {
  if (id == kSchedulerId) return "scheduler";
  if (id <= num_servers_) return "server " + std::to_string(id - 1);
  return "worker " + std::to_string(id - 1 - num_servers_);
}

}  // namespace meshpost
