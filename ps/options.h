// Launch configuration. Every DMLC_* / MESHPOST_* variable maps to one field here;
// OptionsFromEnv() is the one place the environment is read, and Validate() checks any
// options object (from env or built in code) with messages naming the field and value.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "common/env.h"
#include "common/result.h"
#include "ps/trace_options.h"

namespace meshpost {

enum class Role { kScheduler, kServer, kWorker };
const char* RoleName(Role role);

// 50 us of spinning before blocking where cores are plentiful; 0 on machines with fewer
// than 4 cores, where a spinning waiter steals the core its own answer needs (measured:
// a 50 us spin made a same-host AFD round trip 2x slower on 2 shared cores).
int64_t DefaultSpinUs();

struct Options {
  Role role = Role::kWorker;           // DMLC_ROLE
  std::string root_uri = "127.0.0.1";  // DMLC_PS_ROOT_URI
  int root_port = 0;                   // DMLC_PS_ROOT_PORT (0: scheduler picks, see port_fd)
  int num_workers = 1;                 // DMLC_NUM_WORKER
  int num_servers = 1;                 // DMLC_NUM_SERVER
  int group_size = 1;                  // DMLC_GROUP_SIZE
  int node_rank = 0;                   // DMLC_NODE_RANK
  int instance = 0;                    // STEPMESH_GPU or DMLC_INSTANCE_ID
  std::string node_host;               // DMLC_NODE_HOST (default: from interface / root)
  std::string interface;               // DMLC_INTERFACE
  int port = 0;                        // DMLC_PORT (0: OS-assigned)
  int verbose = 0;                     // PS_VERBOSE 0/1/2
  bool enable_rdma = false;            // DMLC_ENABLE_RDMA
  std::string transport = "auto";      // MESHPOST_TRANSPORT: auto|cma|rdma|tcp
  // The transport a data pair must use ("" = choose per pair); DMLC_ENABLE_RDMA=1 is rdma.
  std::string ForcedTransport() const {
    if (enable_rdma) return "rdma";
    return transport == "auto" ? std::string() : transport;
  }
  bool cma_disable = false;            // MESHPOST_CMA_DISABLE: same-host van copies via shm
  int heartbeat_interval_ms = 1000;    // MESHPOST_HEARTBEAT_INTERVAL_MS
  int heartbeat_timeout_ms = 6000;     // MESHPOST_HEARTBEAT_TIMEOUT_MS
  int64_t spin_us = DefaultSpinUs();    // MESHPOST_SPIN_US: spin before blocking
  bool busy_poll = false;              // MESHPOST_BUSY_POLL: never block
  int start_timeout_ms = 120000;       // MESHPOST_START_TIMEOUT_MS: rendezvous limit
  int max_inflight = 1024;             // MESHPOST_MAX_INFLIGHT: pending requests per worker
  int port_fd = -1;                    // MESHPOST_PORT_FD: scheduler writes its port here
  // Trace capture (MESHPOST_TRACE, MESHPOST_TRACE_DIR, ...): parsed in ps/trace_options.cc.
  TraceOptions trace;

  // Global rank of a worker or server: node_rank * group_size + instance.
  int Rank() const { return node_rank * group_size + instance; }
  Status Validate() const;
};

Result<Options> OptionsFromEnv(const EnvLookup& env = ProcessEnv());

}  // namespace meshpost
