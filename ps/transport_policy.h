// Which data transports a node starts and whether a pair's choice is acceptable, from
// MESHPOST_TRANSPORT (forces one transport for every pair) and StepMesh's
// DMLC_ENABLE_RDMA (RDMA between hosts; co-located pairs keep the same-host transport).
// See docs/configuration.md "Transport selection". Pure functions, tested without vans.
#pragma once

#include <string>
#include <vector>

#include "common/result.h"
#include "ps/options.h"

namespace meshpost {

// The transports a node may use, highest priority first, from the ones compiled in
// (`compiled` ends with "tcp"): a forced one alone; otherwise the same-host ones, rdma
// only when DMLC_ENABLE_RDMA asks for it, then tcp.
std::vector<std::string> CandidateTransports(const Options& o,
                                             const std::vector<std::string>& compiled);

// Checks the transport chosen towards `peer`. With DMLC_ENABLE_RDMA on, a pair on
// different hosts must use rdma: otherwise the error names the variable and why rdma
// could not serve (`rdma_unavailable`: the van's creation or device probe error, OK when
// the van runs here and it is the peer that offers none).
Status CheckPairTransport(const Options& o, const std::string& peer, bool same_host,
                          const std::string& chosen, const Status& rdma_unavailable);

// The one line Start logs when DMLC_ENABLE_RDMA is on but every peer is on this host.
std::string RdmaNotNeededNote(const Options& o, const std::string& same_host_transport);

}  // namespace meshpost
