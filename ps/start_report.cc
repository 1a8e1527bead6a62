#include "ps/start_report.h"

namespace meshpost {

std::string TransportSummary(const std::map<std::string, std::string>& by_peer) {
  // (transport, role) -> count, in first-seen order of transports for a stable line.
  std::map<std::pair<std::string, std::string>, int> counts;
  for (const auto& [peer, transport] : by_peer) {
    const std::string role = peer.substr(0, peer.find(' '));
    ++counts[{transport.empty() ? std::string("no transport") : transport, role}];
  }
  if (counts.empty()) return "no data peers";
  std::string out;
  for (const auto& [key, n] : counts) {
    const auto& [transport, role] = key;
    out += (out.empty() ? "" : ", ") + std::to_string(n) + " " + role + (n == 1 ? "" : "s") +
           " via " + transport;
  }
  return out;
}

std::string WaitingFor(const std::vector<std::string>& missing, int registered, int expected,
                       size_t max_named) {
  std::string names;
  for (size_t i = 0; i < missing.size() && i < max_named; ++i) {
    names += (i == 0 ? "" : ", ") + missing[i];
  }
  if (missing.size() > max_named) {
    names += " and " + std::to_string(missing.size() - max_named) + " more";
  }
  return "waiting for " + names + " (" + std::to_string(registered) + " of " +
         std::to_string(expected) + " registered)";
}

}  // namespace meshpost
