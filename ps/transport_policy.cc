#include "ps/transport_policy.h"

#include <algorithm>

namespace meshpost {

namespace {

std::string Setting(const Options& o) {
  return o.enable_rdma_setting.empty() ? std::string("DMLC_ENABLE_RDMA=1") : o.enable_rdma_setting;
}

}  // namespace

std::vector<std::string> CandidateTransports(const Options& o,
                                             const std::vector<std::string>& compiled) {
  const std::string forced = o.ForcedTransport();
  if (!forced.empty()) return {forced};
  std::vector<std::string> out;
  for (const std::string& name : compiled) {
    if (name == "rdma" && !o.enable_rdma) continue;
    out.push_back(name);
  }
  if (std::find(out.begin(), out.end(), "tcp") == out.end()) out.push_back("tcp");
  return out;
}

Status CheckPairTransport(const Options& o, const std::string& peer, bool same_host,
                          const std::string& chosen, const Status& rdma_unavailable) {
  if (!o.ForcedTransport().empty() || !o.enable_rdma || same_host || chosen == "rdma") {
    return OkStatus();
  }
  const std::string why = rdma_unavailable.ok()
                              ? std::string(
                                    "the peer offers no rdma endpoint (its own RDMA "
                                    "device is missing or it does not enable RDMA)")
                              : rdma_unavailable.message();
  return UnavailableError(Setting(o) + ": " + peer +
                          " is on another host and needs RDMA, but RDMA cannot run: " + why +
                          ". Unset DMLC_ENABLE_RDMA (or set it to zmq) to use tcp between "
                          "hosts");
}

std::string RdmaNotNeededNote(const Options& o, const std::string& same_host_transport) {
  return Setting(o) + ": every peer is on this host; the same-host transport (" +
         same_host_transport + ") serves them and RDMA was not needed";
}

}  // namespace meshpost
