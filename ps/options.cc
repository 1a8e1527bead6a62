#include "ps/options.h"

#include <sched.h>

#include <algorithm>
#include <cctype>
#include <climits>
#include <thread>

#include "common/auth.h"
#include "van/registry.h"

namespace meshpost {

int64_t DefaultSpinUs() { return std::thread::hardware_concurrency() >= 4 ? 50 : 0; }

int64_t AutoSpinUs(int local_data_nodes, bool caller_progress) {
  cpu_set_t set;
  CPU_ZERO(&set);
  const int cores = ::sched_getaffinity(0, sizeof(set), &set) == 0
                        ? CPU_COUNT(&set)
                        : static_cast<int>(std::thread::hardware_concurrency());
  if (caller_progress && local_data_nodes <= cores) return kAutoSpinUs;
  return DefaultSpinUs();
}

const char* RoleName(Role role) {
  switch (role) {
    case Role::kScheduler: return "scheduler";
    case Role::kServer: return "server";
    case Role::kWorker: return "worker";
  }
  return "unknown";
}

LogLevel Options::EffectiveLogLevel() const {
  return log_level != LogLevel::kUnset ? log_level : LogLevelFromVerbose(verbose);
}

namespace {

using G = OptionGroup;

// Row readers (OptionRead): the field a variable fills and, for integers, its range.
constexpr bool kRequiredVar = true;
OptionRead Int(int Options::*field, int64_t min, int64_t max, bool required = false) {
  return {field, min, max, required};
}
OptionRead Int64(int64_t Options::*field, int64_t min, int64_t max) { return {field, min, max}; }
OptionRead Bool(bool Options::*field) { return {field}; }
OptionRead Str(std::string Options::*field, bool required = false) {
  return {field, 0, 0, required};
}

// The one list of variables. Order is the order of the docs' tables.
const std::vector<OptionSpec> kTable = {
    {"DMLC_ROLE", "", G::kLaunch, "required", "`scheduler`, `server`, `worker`",
     "this process's role"},
    {"DMLC_PS_ROOT_URI", "root_uri", G::kLaunch, "required", "host name or IP", "scheduler host",
     Str(&Options::root_uri, kRequiredVar)},
    {"DMLC_PS_ROOT_PORT", "root_port", G::kLaunch, "required",
     "1–65535; `0` only for the scheduler (picks a free port, see `MESHPOST_PORT_FD`)",
     "scheduler port", Int(&Options::root_port, 0, 65535, kRequiredVar)},
    {"DMLC_NUM_WORKER", "num_workers", G::kLaunch, "required", "1–4096",
     "number of workers (attention ranks) in the cluster",
     Int(&Options::num_workers, 1, 4096, kRequiredVar)},
    {"DMLC_NUM_SERVER", "num_servers", G::kLaunch, "required", "1–4096",
     "number of servers (FFN ranks) in the cluster",
     Int(&Options::num_servers, 1, 4096, kRequiredVar)},
    {"DMLC_GROUP_SIZE", "group_size", G::kLaunch, "1", "1–4096",
     "ranks per node (e.g. GPUs per host); a factor of the rank",
     Int(&Options::group_size, 1, 4096)},
    {"DMLC_NODE_RANK", "node_rank", G::kLaunch, "0", "0–4095", "node index within the role",
     Int(&Options::node_rank, 0, 4095)},
    {"STEPMESH_GPU", "gpu", G::kLaunch, "0", "0–4095",
     "device index of this process within its node; a term of the rank",
     Int(&Options::gpu, 0, 4095)},
    {"DMLC_INSTANCE_ID", "instance", G::kLaunch, "`STEPMESH_GPU`", "0–4095",
     "instance index within the node group (informational: meshpost runs one instance per "
     "process)",
     Int(&Options::instance, 0, 4095)},
    {"DMLC_RANK_OFFSET", "rank_offset", G::kLaunch, "0", "-4096–4096",
     "added to the rank (e.g. `-STEPMESH_GPU` for one cluster per GPU)",
     Int(&Options::rank_offset, -4096, 4096)},
    {"DMLC_NODE_HOST", "node_host", G::kLaunch,
     "from `DMLC_INTERFACE`, else `127.0.0.1` when the root URI is loopback, else the first "
     "non-loopback IPv4",
     "host/IP", "address advertised to peers", Str(&Options::node_host)},
    {"DMLC_INTERFACE", "interface", G::kLaunch, "unset",
     "an interface name (`eth0`; unknown names list the interfaces that exist) or `auto` "
     "(first up non-loopback IPv4 interface; loopback when the root URI is loopback)",
     "network interface whose IPv4 address is advertised", Str(&Options::interface)},
    {"DMLC_PORT", "port", G::kLaunch, "0 (OS-assigned)", "0–65535",
     "fixed port for this worker/server", Int(&Options::port, 0, 65535)},
    {"DMLC_ENABLE_RDMA", "enable_rdma", G::kLaunch, "unset (no RDMA)",
     "`zmq`/`0`/`false`: no RDMA (same-host transport between co-located processes, tcp "
     "between hosts); `ibverbs`/`1`/`true`: RDMA between hosts (co-located pairs keep the "
     "same-host transport; Start fails naming the device probe's reason when a pair on "
     "different hosts needs RDMA and there is no device). `fabric`, `ucx`, `tp`, `multivan` "
     "are refused with the list of supported values",
     "StepMesh's van selection"},
    {"DMLC_PS_VAN_TYPE", "", G::kLaunch, "`zmq`", "as `DMLC_ENABLE_RDMA`",
     "read when `DMLC_ENABLE_RDMA` is unset (ps-lite's name)"},
    {"DMLC_ENABLE_UCX", "", G::kLaunch, "0", "`0`; `1` is refused (meshpost has no UCX van)",
     "StepMesh's UCX switch"},
    {"PS_VERBOSE", "verbose", G::kLaunch, "0",
     "0 info, 1 debug, 2 (or more) trace; `MESHPOST_LOG_LEVEL` wins", "log level (StepMesh's)",
     Int(&Options::verbose, 0, INT_MAX)},
    {"STEPMESH_BIND_CPU_CORE", "bind_cpu_core", G::kLaunch, "0",
     "boolean (StepMesh defaults to 1; meshpost to 0, as it also runs on shared laptops)",
     "pin meshpost's own threads (receive, progress, heartbeat) to consecutive cores",
     Bool(&Options::bind_cpu_core)},
    {"STEPMESH_CPU_START_OFFSET", "cpu_start_offset", G::kLaunch, "0", "0–65535",
     "first core for `STEPMESH_BIND_CPU_CORE`; a core this process may not use gives one "
     "warning and no pinning, never a failure",
     Int(&Options::cpu_start_offset, 0, 65535)},

    {"MESHPOST_TRANSPORT", "transport", G::kMeshpost,
     "`auto` (per pair: same host > rdma (when `DMLC_ENABLE_RDMA` asks for it) > tcp)",
     "`auto`, `cma`, `rdma`, `tcp`; forcing one that cannot run (not built, no device, peer "
     "on another host) fails `Start` saying why",
     "data transport between workers and servers, forced for every pair", Str(&Options::transport)},
    {"MESHPOST_LOG_LEVEL", "log_level", G::kMeshpost, "from `PS_VERBOSE` (info)",
     "`trace`, `debug`, `info`, `warn`, `error`, `off`", "log level"},
    {"MESHPOST_CMA_DISABLE", "cma_disable", G::kMeshpost, "0", "boolean",
     "same-host transport: skip cross-memory attach and copy through shared memory (the "
     "automatic fallback where CMA is refused)",
     Bool(&Options::cma_disable)},
    {"MESHPOST_CMA_RING", "cma_ring", G::kMeshpost, "262144 (256 KiB)",
     "0, or a power of two 4096–67108864",
     "same-host transport: bytes of each connection's frame ring in shared memory, which "
     "carries the doorbell frames without a system call (a sleeping receiver is woken "
     "through the socket); 0 = every frame through the socket (docs/performance.md)",
     Int64(&Options::cma_ring, 0, int64_t{64} << 20)},
    {"MESHPOST_CMA_GPU", "cma_gpu", G::kMeshpost, "ipc", "`ipc`, `staging`",
     "how CUDA tensors cross same-host pairs: `ipc` = CUDA IPC, the receiver copies device "
     "to device straight into the pull tensor (or the server computes into it: no copy); "
     "`staging` = through pinned host memory as on tcp (docs/gpu.md)",
     Str(&Options::cma_gpu)},
    {"MESHPOST_HEARTBEAT_INTERVAL_MS", "heartbeat_interval_ms", G::kMeshpost, "1000", "10–600000",
     "heartbeat period", Int(&Options::heartbeat_interval_ms, 10, 600000)},
    {"MESHPOST_HEARTBEAT_TIMEOUT_MS", "heartbeat_timeout_ms", G::kMeshpost, "6000",
     "≥ 2 × interval", "silence after which a node is declared dead",
     Int(&Options::heartbeat_timeout_ms, 50, 3600000)},
    {"MESHPOST_SPIN_US", "spin_us", G::kMeshpost,
     "automatic: 300 for `wait` / `get_batch` when they receive over cma themselves "
     "(`MESHPOST_CALLER_PROGRESS`) and this host runs no more workers and servers than "
     "there are cores (no spin after a wait that timed out, so an idle node does not "
     "spin); otherwise 50 on machines with ≥ 4 cores and 0 below (spinning there steals "
     "the core the answer needs)",
     "0–10000000", "spin before blocking in every wait", Int64(&Options::spin_us, 0, 10000000)},
    {"MESHPOST_BUSY_POLL", "busy_poll", G::kMeshpost, "0", "boolean",
     "never block (dedicated cores)", Bool(&Options::busy_poll)},
    {"MESHPOST_CALLER_PROGRESS", "caller_progress", G::kMeshpost, "1", "boolean",
     "a thread waiting in `wait` / `get_batch` receives same-host (cma) messages itself "
     "instead of being woken by the van's receive thread (one wake-up per side of a round "
     "trip instead of two; docs/threads.md)",
     Bool(&Options::caller_progress)},
    {"MESHPOST_START_TIMEOUT_MS", "start_timeout_ms", G::kMeshpost, "120000", "≥ 100",
     "limit for rendezvous in `Start()`; who is missing is logged every 5 s",
     Int(&Options::start_timeout_ms, 100, INT_MAX)},
    {"MESHPOST_MAX_INFLIGHT", "max_inflight", G::kMeshpost, "1024", "1–1048576",
     "pending requests per worker", Int(&Options::max_inflight, 1, 1 << 20)},
    {"MESHPOST_GPU_STAGING_CHUNK", "gpu_staging_chunk", G::kMeshpost, "4194304 (4 MiB)",
     "65536–1073741824",
     "bytes per pinned staging chunk for CUDA tensors: device↔pinned "
     "copies are split into chunks of this size, each completing on its own (docs/gpu.md)",
     Int64(&Options::gpu_staging_chunk, 65536, int64_t{1} << 30)},
    {"MESHPOST_SHARED_PUSH_MIN", "shared_push_min", G::kMeshpost, "65536 (64 KiB)",
     "0–1099511627776; 0 = never",
     "ordinary (not `meshpost.empty`) host push tensors of at least this many bytes are "
     "copied once into shared memory when a server is on this host, so the server views "
     "them instead of reading them across processes (docs/performance.md)",
     Int64(&Options::shared_push_min, 0, int64_t{1} << 40)},
    {"MESHPOST_PORT_FD", "port_fd", G::kMeshpost, "unset",
     "an open fd; used by launchers with `DMLC_PS_ROOT_PORT=0`",
     "(scheduler) file descriptor to which the bound port is written, then closed",
     Int(&Options::port_fd, 0, 1 << 20)},
    {"MESHPOST_CLUSTER_TOKEN", "cluster_token", G::kMeshpost,
     "unset (unauthenticated; the local launchers generate one per cluster)",
     "≥ 16 bytes; not together with `MESHPOST_CLUSTER_TOKEN_FILE`",
     "cluster secret: every connection proves knowledge of it, and messages are attributed to "
     "the authenticated peer (docs/security.md)"},
    {"MESHPOST_CLUSTER_TOKEN_FILE", "cluster_token_file", G::kMeshpost, "unset",
     "a readable file with ≥ 16 bytes",
     "file holding the cluster secret (trailing whitespace ignored)"},
    {"MESHPOST_AUTH_PAYLOAD", "auth_payload", G::kMeshpost, "0", "boolean; needs a cluster token",
     "tcp: also MAC every message's data frames (Poly1305), so tensor bytes altered in flight "
     "are refused; costs about 1 ms per 2.7 MB on each side, AFD p50 x1.8 on a 2-core box "
     "(docs/security.md)",
     Bool(&Options::auth_payload)},
    {"MESHPOST_MAX_MESSAGE_BYTES", "max_message_bytes", G::kMeshpost, "1073741824 (1 GiB)",
     "≥ 4096",
     "largest frame a peer may send; a larger one closes that connection before anything is "
     "allocated. Over tcp one tensor is one frame: a larger tensor fails its push_pull or "
     "respond with INVALID_ARGUMENT before it is sent",
     Int64(&Options::max_message_bytes, 4096, INT64_MAX)},
    {"MESHPOST_TRACE", "trace", G::kMeshpost, "off",
     "`off`, `all`, `sample:N` (about one push_pull in N, chosen by a hash of the handle: the same "
     "requests at worker and server), `alternate:N` (handle ids in alternating blocks of N "
     "captured / not: overhead A/B runs)",
     "capture per-request trace records to files (docs/profiling.md)"},
    {"MESHPOST_TRACE_DIR", "trace_dir", G::kMeshpost, "unset", "a directory (created if missing)",
     "where each worker and server writes its own trace files"},
    {"MESHPOST_TRACE_FILE_MB", "trace_file_mb", G::kMeshpost, "64", "1–1048576",
     "rotate a node's trace file above this size"},
    {"MESHPOST_TRACE_MAX_FILES", "trace_max_files", G::kMeshpost, "8", "1–100000",
     "rotated trace files kept per node (oldest deleted)"},
    {"MESHPOST_TRACE_RING", "trace_ring", G::kMeshpost, "65536", "16–16777216",
     "records buffered between the data path and the trace writer thread; when full, records "
     "are dropped and counted, never waited for"},

    {"MESHPOST_RDMA_DEVICE", "rdma_device", G::kRdma, "the first device with an active port",
     "a device name (`mlx5_0`), optionally `:port`", "RDMA device"},
    {"MESHPOST_RDMA_PORT", "rdma_port", G::kRdma, "the first active port", "1–255", "device port"},
    {"MESHPOST_RDMA_GID_INDEX", "rdma_gid_index", G::kRdma,
     "-1 (RoCE v2 GID of `DMLC_INTERFACE`'s address, else the first usable)", "-1–1023",
     "GID table index"},
    {"MESHPOST_RDMA_INLINE", "rdma_inline", G::kRdma, "the device's limit", "0–4096",
     "largest payload sent inline"},
    {"MESHPOST_RDMA_HEADER_SLOTS", "rdma_header_slots", G::kRdma, "see docs/rdma.md",
     "1–the van's maximum", "header ring slots per peer"},
    {"MESHPOST_RDMA_HEADER_BYTES", "rdma_header_bytes", G::kRdma, "see docs/rdma.md",
     "the van's slot size range", "bytes per header slot"},
    {"MESHPOST_RDMA_MR_CACHE", "rdma_mr_cache", G::kRdma, "see docs/rdma.md", "1–1048576",
     "registered memory regions kept"},
    {"MESHPOST_RDMA_GPU", "rdma_gpu", G::kRdma, "auto", "`auto`, `dmabuf`, `peermem`, `staging`",
     "how CUDA tensors cross rdma pairs: GPUDirect, the push, pull and response tensors "
     "registered and moved in place, with `dmabuf` = `ibv_reg_dmabuf_mr`, `peermem` = "
     "`ibv_reg_mr` on device memory (nvidia-peermem), `auto` = the first that works; or "
     "`staging` = no GPUDirect, GPU tensors go through pinned host memory (docs/gpu.md)"},

    {"STEPMESH_SPLIT_QP_LAG", "", G::kIgnored, "",
     "meshpost opens one queue pair per peer; "
     "balancing QPs over bonded (LAG) ports is not implemented",
     "QP balance over bonded NICs"},
    {"STEPMESH_DROP_RATE", "", G::kIgnored, "",
     "a fault-injection knob of StepMesh's tests; "
     "meshpost's tests kill and freeze peers instead",
     "drop a share of messages (testing)"},
    {"PS_DROP_MSG", "", G::kIgnored, "", "as `STEPMESH_DROP_RATE` (ps-lite's name)",
     "drop a share of messages (testing)"},
    {"STEPMESH_MEM_SYNC", "", G::kIgnored, "",
     "a GPU-kernel synchronisation mode; meshpost "
     "orders GPU work with `need_event` and fserver_lib's flag kernels (docs/gpu.md)",
     "sync GPU kernels through host memory"},
    {"STEPMESH_BACKEND", "", G::kIgnored, "", "the tensor's device chooses the backend",
     "CPU or GPU backend"},
    {"STEPMESH_BAKCEND", "", G::kIgnored, "",
     "StepMesh's spelling in its docs; as "
     "`STEPMESH_BACKEND`",
     "CPU or GPU backend"},
    {"STEPMESH_CPU_CORES_PER_SOCKET", "", G::kIgnored, "",
     "meshpost pins from "
     "`STEPMESH_CPU_START_OFFSET` only; NUMA placement is left to `numactl`/`taskset`",
     "cores per socket for pinning"},
    {"STEPMESH_CPU_CORES_PER_GPU", "", G::kIgnored, "", "as `STEPMESH_CPU_CORES_PER_SOCKET`",
     "cores per GPU for pinning"},
    {"DMLC_LOCAL", "", G::kIgnored, "",
     "same-host peers are detected (host identity) and use "
     "the same-host transport without it",
     "run on one machine"},
    {"DMLC_NUM_PORTS", "", G::kIgnored, "",
     "one port per node; meshpost's rdma van uses one "
     "device port",
     "ports per node"},
    {"PS_RESEND", "", G::kIgnored, "",
     "meshpost does not resend: transports are reliable and a "
     "dead peer fails the pending handles",
     "resend unacknowledged messages"},
    {"PS_RESEND_TIMEOUT", "", G::kIgnored, "", "as `PS_RESEND`", "resend timeout"},
    {"ENABLE_PROFILING", "", G::kIgnored, "",
     "use `fetch_trace` / `fetch_traces` (per-request "
     "stamps) instead",
     "van profiling to a file"},
    {"PROFILE_PATH", "", G::kIgnored, "", "as `ENABLE_PROFILING`", "van profiling file"},
    {"BYTEPS_ENABLE_MIXED_MODE", "", G::kIgnored, "",
     "ranks come from the launch variables, "
     "not from host ordering",
     "BytePS rank ordering"},
    {"BYTEPS_ORDERED_HOSTS", "", G::kIgnored, "", "as `BYTEPS_ENABLE_MIXED_MODE`",
     "BytePS rank ordering"},
};

constexpr const char* kRequired =
    "required: DMLC_ROLE, DMLC_PS_ROOT_URI, DMLC_PS_ROOT_PORT, DMLC_NUM_WORKER, "
    "DMLC_NUM_SERVER (see docs/configuration.md)";

Status Missing(const char* name) {
  return InvalidArgumentError(std::string(name) + " is not set; " + kRequired);
}

// Reads the variable of a row with a field (OptionRead) into `o`, when it is set.
Status ReadRow(const EnvLookup& env, const OptionSpec& spec, Options* o) {
  const OptionRead& r = spec.read;
  const char* v = env(spec.variable);
  if (v == nullptr) return r.required ? Missing(spec.variable) : OkStatus();
  if (auto f = std::get_if<int Options::*>(&r.field)) {
    MESHPOST_ASSIGN_OR_RETURN(int64_t n, ParseInt(spec.variable, v, r.min, r.max));
    o->** f = static_cast<int>(n);
  } else if (auto f64 = std::get_if<int64_t Options::*>(&r.field)) {
    MESHPOST_ASSIGN_OR_RETURN(o->**f64, ParseInt(spec.variable, v, r.min, r.max));
  } else if (auto b = std::get_if<bool Options::*>(&r.field)) {
    MESHPOST_ASSIGN_OR_RETURN(o->**b, ParseBool(spec.variable, v));
  } else if (auto str = std::get_if<std::string Options::*>(&r.field)) {
    o->** str = v;
  }
  return OkStatus();
}

std::string Lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

constexpr const char* kVanValues =
    "supported: zmq or 0 (no RDMA: the same-host transport between co-located processes, "
    "tcp between hosts), ibverbs or 1 (RDMA between hosts); unset means zmq";

// StepMesh picks its van from DMLC_ENABLE_RDMA, else DMLC_PS_VAN_TYPE, else zmq; UCX has
// its own switch. meshpost has the zmq (tcp) and ibverbs (rdma) vans of that list.
Status ReadVanType(const EnvLookup& env, bool* enable_rdma, std::string* setting) {
  if (const char* ucx = env("DMLC_ENABLE_UCX")) {
    auto on = ParseBool("DMLC_ENABLE_UCX", ucx);
    if (!on.ok()) return on.status();
    if (*on) {
      return InvalidArgumentError(std::string("DMLC_ENABLE_UCX=") + ucx +
                                  ": meshpost has no UCX van; " + kVanValues +
                                  " (DMLC_ENABLE_RDMA)");
    }
  }
  const char* name = "DMLC_ENABLE_RDMA";
  const char* v = env(name);
  if (v == nullptr) {
    name = "DMLC_PS_VAN_TYPE";
    v = env(name);
  }
  if (v == nullptr) return OkStatus();
  *setting = std::string(name) + "=" + v;
  const std::string value = Lower(v);
  if (value == "zmq" || value == "0" || value == "false" || value == "no" || value == "off" ||
      value.empty()) {
    *enable_rdma = false;
    return OkStatus();
  }
  if (value == "ibverbs" || value == "1" || value == "true" || value == "yes" || value == "on") {
    *enable_rdma = true;
    return OkStatus();
  }
  if (value == "fabric" || value == "ucx" || value == "tp" || value == "multivan") {
    return InvalidArgumentError(std::string(name) + "='" + v + "' selects StepMesh's " + value +
                                " van, which meshpost does not have; " + kVanValues);
  }
  return InvalidArgumentError(std::string(name) + "='" + v + "' is not a van type; " + kVanValues);
}

size_t EditDistance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1])});
    }
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

const OptionSpec* Known(const std::string& name) {
  for (const OptionSpec& o : kTable) {
    if (name == o.variable) return &o;
  }
  return nullptr;
}

// Variables of meshpost's own tools (tests, benchmarks, demo, build and CI scripts), which
// share the MESHPOST_ prefix but are not options of a node.
bool IsToolVariable(const std::string& name) {
  for (const char* prefix :
       {"MESHPOST_ITEST_", "MESHPOST_BENCH_", "MESHPOST_DEMO_", "MESHPOST_BUILD_",
        "MESHPOST_PYTEST_", "MESHPOST_TEST_", "MESHPOST_DEPS", "MESHPOST_CI_"}) {
    if (name.rfind(prefix, 0) == 0) return true;
  }
  return false;
}

void NoteNames(const EnvLookup& env, const std::vector<std::string>& names, Options* o) {
  for (const std::string& name : names) {
    const OptionSpec* spec = Known(name);
    if (spec != nullptr) {
      if (spec->group == G::kIgnored) {
        const char* v = env(name.c_str());
        o->ignored.push_back(name + "=" + (v ? v : "") + " accepted and ignored: " + spec->valid);
      }
      continue;
    }
    if (name.rfind("MESHPOST_", 0) == 0 && !IsToolVariable(name)) {
      o->warnings.push_back("unknown variable " + name + " ignored; did you mean " +
                            ClosestKnownVariable(name) + "? (see docs/configuration.md)");
    }
  }
}

}  // namespace

const char* OptionGroupName(OptionGroup group) {
  switch (group) {
    case G::kLaunch: return "launch";
    case G::kMeshpost: return "meshpost";
    case G::kRdma: return "rdma";
    case G::kIgnored: return "ignored";
  }
  return "unknown";
}

const std::vector<OptionSpec>& OptionTable() { return kTable; }

std::string ClosestKnownVariable(const std::string& name) {
  const OptionSpec* best = nullptr;
  size_t best_d = SIZE_MAX;
  // Prefer meshpost's own names for a MESHPOST_* typo, then any name.
  for (int pass = 0; pass < 2 && best == nullptr; ++pass) {
    for (const OptionSpec& o : kTable) {
      const std::string v = o.variable;
      if (pass == 0 && v.rfind("MESHPOST_", 0) != 0) continue;
      const size_t d = EditDistance(name, v);
      if (d < best_d) {
        best_d = d;
        best = &o;
      }
    }
  }
  return best == nullptr ? std::string() : best->variable;
}

std::string OptionTableMarkdown(OptionGroup group) {
  std::string out;
  if (group == G::kIgnored) {
    out += "| variable | StepMesh meaning | why meshpost ignores it |\n|---|---|---|\n";
  } else {
    out +=
        "| variable | Python keyword | meaning | default | valid values |\n"
        "|---|---|---|---|---|\n";
  }
  for (const OptionSpec& o : kTable) {
    if (o.group != group) continue;
    out += std::string("| `") + o.variable + "` | ";
    if (group == G::kIgnored) {
      out += std::string(o.meaning) + " | " + o.valid + " |\n";
      continue;
    }
    out += (*o.keyword ? std::string("`") + o.keyword + "`" : std::string("—")) + " | " +
           o.meaning + " | " + o.default_value + " | " + o.valid + " |\n";
  }
  return out;
}

Result<Options> OptionsFromEnv(const EnvLookup& env, const std::vector<std::string>& names) {
  Options o;
  const char* role = env("DMLC_ROLE");
  if (role == nullptr) return Missing("DMLC_ROLE");
  const std::string r = role;
  if (r == "scheduler") {
    o.role = Role::kScheduler;
  } else if (r == "server") {
    o.role = Role::kServer;
  } else if (r == "worker") {
    o.role = Role::kWorker;
  } else {
    return InvalidArgumentError("DMLC_ROLE='" + r + "'; expected scheduler, server or worker");
  }
  // Every row with a field (OptionRead), in the table's order.
  for (const OptionSpec& spec : kTable) {
    if (std::holds_alternative<std::monostate>(spec.read.field)) continue;
    MESHPOST_RETURN_IF_ERROR(ReadRow(env, spec, &o));
  }
  // StepMesh: the rank counts STEPMESH_GPU; DMLC_INSTANCE_ID defaults to it.
  if (env("DMLC_INSTANCE_ID") == nullptr) o.instance = o.gpu;
  if (Lower(o.interface) == "auto") o.interface = "auto";
  // The rows read by hand.
  if (const char* v = env("MESHPOST_LOG_LEVEL")) {
    MESHPOST_ASSIGN_OR_RETURN(o.log_level, ParseLogLevel("MESHPOST_LOG_LEVEL", v));
  }
  MESHPOST_RETURN_IF_ERROR(ReadVanType(env, &o.enable_rdma, &o.enable_rdma_setting));
  MESHPOST_ASSIGN_OR_RETURN(o.cluster_token, ClusterTokenFromEnv(env));
  for (const OptionSpec& spec : kTable) {
    if (spec.group != G::kRdma) continue;
    if (const char* v = env(spec.variable)) o.rdma_env[spec.variable] = v;
  }
  NoteNames(env, names, &o);
  MESHPOST_RETURN_IF_ERROR(ReadTraceOptions(env, &o.trace));  // MESHPOST_TRACE*
  MESHPOST_RETURN_IF_ERROR(o.Validate());
  return o;
}

Status Options::Validate() const {
  auto bad = [](const std::string& field, const std::string& value, const std::string& want) {
    return InvalidArgumentError("option " + field + "=" + value + " is invalid; expected " + want);
  };
  if (root_uri.empty()) return bad("root_uri (DMLC_PS_ROOT_URI)", "''", "a host name or IP");
  if (root_port < 0 || root_port > 65535) {
    return bad("root_port (DMLC_PS_ROOT_PORT)", std::to_string(root_port), "0..65535");
  }
  if (root_port == 0 && role != Role::kScheduler) {
    return bad("root_port (DMLC_PS_ROOT_PORT)", "0",
               "the scheduler's port (only the scheduler may use 0 to pick a free port)");
  }
  if (num_workers < 1)
    return bad("num_workers (DMLC_NUM_WORKER)", std::to_string(num_workers), ">= 1");
  if (num_servers < 1)
    return bad("num_servers (DMLC_NUM_SERVER)", std::to_string(num_servers), ">= 1");
  if (group_size < 1)
    return bad("group_size (DMLC_GROUP_SIZE)", std::to_string(group_size), ">= 1");
  if (gpu < 0) return bad("gpu (STEPMESH_GPU)", std::to_string(gpu), ">= 0");
  if (instance < 0) return bad("instance (DMLC_INSTANCE_ID)", std::to_string(instance), ">= 0");
  if (node_rank < 0) return bad("node_rank (DMLC_NODE_RANK)", std::to_string(node_rank), ">= 0");
  if (role != Role::kScheduler) {
    const int count = role == Role::kServer ? num_servers : num_workers;
    if (Rank() < 0 || Rank() >= count) {
      const char* var = role == Role::kServer ? "DMLC_NUM_SERVER" : "DMLC_NUM_WORKER";
      std::string want = "0 <= rank < " + std::to_string(count) + " (" + var + ")";
      // StepMesh counts DMLC_NUM_* per node group (DMLC_NUM_WORKER x DMLC_GROUP_SIZE
      // instances); meshpost counts ranks. Say so where that is the likely mix-up.
      if (group_size > 1 && Rank() >= 0 && Rank() < count * group_size) {
        want +=
            "; meshpost's DMLC_NUM_WORKER/DMLC_NUM_SERVER count ranks, not StepMesh's "
            "node groups: set " +
            std::string(var) + "=" + std::to_string(count * group_size) + " for " +
            std::to_string(count) + " node(s) of DMLC_GROUP_SIZE=" + std::to_string(group_size);
      }
      return bad(
          std::string(RoleName(role)) +
              " rank (DMLC_NODE_RANK * DMLC_GROUP_SIZE + STEPMESH_GPU + DMLC_RANK_OFFSET = " +
              std::to_string(node_rank) + " * " + std::to_string(group_size) + " + " +
              std::to_string(gpu) + " + " + std::to_string(rank_offset) + ")",
          std::to_string(Rank()), want);
    }
  }
  if (port < 0 || port > 65535) return bad("port (DMLC_PORT)", std::to_string(port), "0..65535");
  if (verbose < 0) return bad("verbose (PS_VERBOSE)", std::to_string(verbose), ">= 0");
  if (gpu_staging_chunk < 65536 || gpu_staging_chunk > (int64_t{1} << 30)) {
    return bad("gpu_staging_chunk (MESHPOST_GPU_STAGING_CHUNK)", std::to_string(gpu_staging_chunk),
               "65536..1073741824 bytes");
  }
  if (shared_push_min < 0 || shared_push_min > (int64_t{1} << 40)) {
    return bad("shared_push_min (MESHPOST_SHARED_PUSH_MIN)", std::to_string(shared_push_min),
               "0..1099511627776 bytes");
  }
  if (cma_ring != 0 &&
      (cma_ring < 4096 || cma_ring > (int64_t{64} << 20) || (cma_ring & (cma_ring - 1)) != 0)) {
    return bad("cma_ring (MESHPOST_CMA_RING)", std::to_string(cma_ring),
               "0, or a power of two from 4096 to 67108864 bytes");
  }
  if (cma_gpu != "ipc" && cma_gpu != "staging") {
    return bad("cma_gpu (MESHPOST_CMA_GPU)", "'" + cma_gpu + "'", "ipc or staging");
  }
  if (transport != "auto" && !IsKnownTransport(transport)) {
    return bad("transport (MESHPOST_TRANSPORT)", "'" + transport + "'",
               "auto, " + KnownTransportNames());
  }
  if (cpu_start_offset < 0) {
    return bad("cpu_start_offset (STEPMESH_CPU_START_OFFSET)", std::to_string(cpu_start_offset),
               ">= 0");
  }
  if (heartbeat_interval_ms < 10) {
    return bad("heartbeat_interval_ms", std::to_string(heartbeat_interval_ms), ">= 10");
  }
  if (heartbeat_timeout_ms < 2 * heartbeat_interval_ms) {
    return bad("heartbeat_timeout_ms (MESHPOST_HEARTBEAT_TIMEOUT_MS)",
               std::to_string(heartbeat_timeout_ms),
               ">= 2 * heartbeat_interval_ms = " + std::to_string(2 * heartbeat_interval_ms));
  }
  if (spin_us < -1) {
    return bad("spin_us (MESHPOST_SPIN_US)", std::to_string(spin_us), ">= 0 (or -1: automatic)");
  }
  if (start_timeout_ms < 100)
    return bad("start_timeout_ms", std::to_string(start_timeout_ms), ">= 100");
  if (max_inflight < 1) return bad("max_inflight", std::to_string(max_inflight), ">= 1");
  MESHPOST_RETURN_IF_ERROR(ValidateClusterToken(cluster_token, "option cluster_token"));
  if (auth_payload && cluster_token.empty()) {
    return bad("auth_payload (MESHPOST_AUTH_PAYLOAD)", "1",
               "payload MACs use the per-connection key of an authenticated cluster: set "
               "MESHPOST_CLUSTER_TOKEN (or MESHPOST_CLUSTER_TOKEN_FILE) too");
  }
  if (max_message_bytes < 4096) {
    return bad("max_message_bytes (MESHPOST_MAX_MESSAGE_BYTES)", std::to_string(max_message_bytes),
               ">= 4096");
  }
  MESHPOST_RETURN_IF_ERROR(ValidateTraceOptions(trace));
  return OkStatus();
}

}  // namespace meshpost
