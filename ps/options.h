// Launch configuration. Every DMLC_* / STEPMESH_* / MESHPOST_* variable maps to one field
// here; OptionsFromEnv() is the one place the environment is read, and Validate() checks
// any options object (from env or built in code) with messages naming the field and value.
// OptionTable() is the one list of variables: the Python keyword map and the tables in
// docs/configuration.md are generated from it (tests check that they agree).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <variant>
#include <vector>

#include "common/env.h"
#include "common/log_level.h"
#include "common/result.h"
#include "ps/trace_options.h"

namespace meshpost {

class DeviceBackend;  // tensor/device_backend.h

enum class Role { kScheduler, kServer, kWorker };
const char* RoleName(Role role);

// 50 us of spinning before blocking where cores are plentiful; 0 on machines with fewer
// than 4 cores, where a spinning waiter steals the core its own answer needs (measured:
// a 50 us spin made a same-host AFD round trip 2x slower on 2 shared cores).
int64_t DefaultSpinUs();
// MESHPOST_SPIN_US unset, for the threads waiting in Wait / GetBatch: kAutoSpinUs when
// they receive themselves (caller-driven progress over cma) and this host runs no more
// workers and servers than this process may use cores, so every spinning thread has a
// core; otherwise DefaultSpinUs(). 300 us covers an AFD-sized round trip on a 2-vCPU VM
// (docs/performance.md); a wait that timed out makes the next one skip it (Waiter).
constexpr int64_t kAutoSpinUs = 300;
int64_t AutoSpinUs(int local_data_nodes, bool caller_progress);

struct Options {
  Role role = Role::kWorker;              // DMLC_ROLE
  std::string root_uri = "127.0.0.1";     // DMLC_PS_ROOT_URI
  int root_port = 0;                      // DMLC_PS_ROOT_PORT (0: scheduler picks, see port_fd)
  int num_workers = 1;                    // DMLC_NUM_WORKER
  int num_servers = 1;                    // DMLC_NUM_SERVER
  int group_size = 1;                     // DMLC_GROUP_SIZE
  int node_rank = 0;                      // DMLC_NODE_RANK
  int gpu = 0;                            // STEPMESH_GPU: device index, part of the rank
  int instance = 0;                       // DMLC_INSTANCE_ID (default: STEPMESH_GPU)
  int rank_offset = 0;                    // DMLC_RANK_OFFSET
  std::string node_host;                  // DMLC_NODE_HOST (default: from interface / root)
  std::string interface;                  // DMLC_INTERFACE ("auto": see docs/configuration.md)
  int port = 0;                           // DMLC_PORT (0: OS-assigned)
  int verbose = 0;                        // PS_VERBOSE: 0 info, 1 debug, >= 2 trace
  LogLevel log_level = LogLevel::kUnset;  // MESHPOST_LOG_LEVEL (wins over PS_VERBOSE)
  // DMLC_ENABLE_RDMA (or DMLC_PS_VAN_TYPE): pairs on different hosts must use RDMA;
  // co-located pairs keep the same-host transport.
  bool enable_rdma = false;
  std::string enable_rdma_setting;  // e.g. "DMLC_ENABLE_RDMA=ibverbs", for messages
  std::string transport = "auto";   // MESHPOST_TRANSPORT: auto|cma|rdma|tcp
  // The transport every data pair must use ("" = choose per pair).
  std::string ForcedTransport() const { return transport == "auto" ? std::string() : transport; }
  bool cma_disable = false;     // MESHPOST_CMA_DISABLE: same-host van copies via shm
  std::string cma_gpu = "ipc";  // MESHPOST_CMA_GPU: ipc|staging (CUDA tensors, same host)
  // MESHPOST_CMA_RING: bytes of each same-host connection's shared-memory frame ring
  // (a power of two, 4 KiB - 64 MiB); 0 = frames through the socket only.
  int64_t cma_ring = int64_t{256} << 10;
  bool bind_cpu_core = false;        // STEPMESH_BIND_CPU_CORE: pin meshpost's threads
  int cpu_start_offset = 0;          // STEPMESH_CPU_START_OFFSET: first core to pin to
  int heartbeat_interval_ms = 1000;  // MESHPOST_HEARTBEAT_INTERVAL_MS
  int heartbeat_timeout_ms = 6000;   // MESHPOST_HEARTBEAT_TIMEOUT_MS
  // MESHPOST_SPIN_US: spin before blocking; -1 (unset) = auto: DefaultSpinUs() until
  // Start, then AutoSpinUs for Wait / GetBatch once the cluster is known.
  int64_t spin_us = -1;
  int64_t EffectiveSpinUs() const { return spin_us >= 0 ? spin_us : DefaultSpinUs(); }
  bool busy_poll = false;         // MESHPOST_BUSY_POLL: never block
  bool caller_progress = true;    // MESHPOST_CALLER_PROGRESS: waiters receive themselves
  int start_timeout_ms = 120000;  // MESHPOST_START_TIMEOUT_MS: rendezvous limit
  int max_inflight = 1024;        // MESHPOST_MAX_INFLIGHT: pending requests per worker
  int64_t gpu_staging_chunk = int64_t{4} << 20;  // MESHPOST_GPU_STAGING_CHUNK (bytes)
  // MESHPOST_SHARED_PUSH_MIN: ordinary push tensors of at least this many bytes are copied
  // into shared memory for same-host servers (ps/push_staging.h); 0 = never.
  int64_t shared_push_min = int64_t{64} << 10;
  int port_fd = -1;  // MESHPOST_PORT_FD: scheduler writes its port here
  // Cluster secret (MESHPOST_CLUSTER_TOKEN or the file MESHPOST_CLUSTER_TOKEN_FILE); every
  // connection proves knowledge of it ("" = unauthenticated). See docs/security.md.
  std::string cluster_token;
  // MESHPOST_AUTH_PAYLOAD: tcp data frames carry a MAC too (needs cluster_token).
  bool auth_payload = false;
  // Largest frame a peer may send before its connection is closed (MESHPOST_MAX_MESSAGE_BYTES).
  int64_t max_message_bytes = int64_t{1} << 30;
  // GPU tensors are moved through this backend; null means CudaBackend(). Not from the
  // environment: tests set a FakeBackend (which must outlive the node).
  DeviceBackend* device_backend = nullptr;
  // MESHPOST_RDMA_* as given; the rdma van parses them (its errors name the variable).
  std::map<std::string, std::string> rdma_env;
  // Lines for the log at Start: unknown MESHPOST_* variables (warn, naming the closest
  // known one) and StepMesh variables meshpost accepts and ignores (debug, with why).
  std::vector<std::string> warnings;
  std::vector<std::string> ignored;
  // Trace capture (MESHPOST_TRACE, MESHPOST_TRACE_DIR, ...): parsed in ps/trace_options.cc.
  TraceOptions trace;

  // Global rank of a worker or server, as StepMesh computes it:
  // DMLC_NODE_RANK * DMLC_GROUP_SIZE + STEPMESH_GPU + DMLC_RANK_OFFSET.
  int Rank() const { return node_rank * group_size + gpu + rank_offset; }
  // MESHPOST_LOG_LEVEL when set, else PS_VERBOSE's level.
  LogLevel EffectiveLogLevel() const;
  Status Validate() const;
};

// Reads every variable through `env`. `names` (every variable set, e.g. ProcessEnvNames())
// lets it warn about unknown MESHPOST_* names and note ignored StepMesh ones.
Result<Options> OptionsFromEnv(const EnvLookup& env = ProcessEnv(),
                               const std::vector<std::string>& names = ProcessEnvNames());

// ---- the option table ----

enum class OptionGroup {
  kLaunch,    // ps-lite / BytePS / StepMesh launch variables
  kMeshpost,  // meshpost's own options
  kRdma,      // the rdma van's options (parsed by van/rdma)
  kIgnored,   // StepMesh variables accepted and ignored, with why
};
const char* OptionGroupName(OptionGroup group);

// How OptionsFromEnv() reads a row's variable: the Options field it fills and, for integers,
// the accepted range (inclusive). A row without a field (std::monostate) is read by its own
// code: DMLC_ROLE, MESHPOST_LOG_LEVEL, the van type, the cluster token, the trace and rdma
// rows, and the ignored rows.
using OptionField = std::variant<std::monostate, int Options::*, int64_t Options::*,
                                 bool Options::*, std::string Options::*>;
struct OptionRead {
  OptionField field;
  int64_t min = 0;
  int64_t max = 0;
  bool required = false;  // absence is an error; otherwise the field keeps its default
};

struct OptionSpec {
  const char* variable;
  const char* keyword;  // Python keyword argument ("" when there is none)
  OptionGroup group;
  const char* default_value;
  const char* valid;  // accepted values; for kIgnored rows: why it is ignored
  const char* meaning;
  OptionRead read;  // empty: read by hand in OptionsFromEnv (see OptionRead)
};

const std::vector<OptionSpec>& OptionTable();
// The markdown table of one group, as docs/configuration.md holds it between
// "<!-- options:NAME -->" and "<!-- /options:NAME -->".
std::string OptionTableMarkdown(OptionGroup group);
// The known variable closest to `name` (edit distance), for "did you mean" messages.
std::string ClosestKnownVariable(const std::string& name);

}  // namespace meshpost
