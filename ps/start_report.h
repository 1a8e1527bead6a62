// The few lines a node logs at INFO while it starts: one summary of the transport chosen
// for each peer ("2 servers via cma") instead of a line per peer, and, while Start waits
// for the cluster, who is still missing. Pure text builders, so tests can check them.
#pragma once

#include <map>
#include <string>
#include <vector>

namespace meshpost {

// by_peer: "server 0" -> "cma" (Postoffice::Transports()). Returns e.g.
// "2 servers via cma, 1 server via tcp"; "no data peers" when empty.
std::string TransportSummary(const std::map<std::string, std::string>& by_peer);

// missing: "worker 1", "server 3". Returns
// "waiting for worker 1, server 3 (2 of 4 registered)"; long lists are cut after
// `max_named` names ("... and 12 more").
std::string WaitingFor(const std::vector<std::string>& missing, int registered, int expected,
                       size_t max_named = 16);

// How often Start reports that it is still waiting.
constexpr int kStartProgressIntervalMs = 5000;

}  // namespace meshpost
