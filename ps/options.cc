#include "ps/options.h"

#include <climits>
#include <thread>

#include "van/registry.h"

namespace meshpost {

int64_t DefaultSpinUs() { return std::thread::hardware_concurrency() >= 4 ? 50 : 0; }

const char* RoleName(Role role) {
  switch (role) {
    case Role::kScheduler: return "scheduler";
    case Role::kServer: return "server";
    case Role::kWorker: return "worker";
  }
  return "unknown";
}

namespace {

constexpr const char* kRequired =
    "required: DMLC_ROLE, DMLC_PS_ROOT_URI, DMLC_PS_ROOT_PORT, DMLC_NUM_WORKER, "
    "DMLC_NUM_SERVER (see docs/configuration.md)";

Status Missing(const char* name) {
  return InvalidArgumentError(std::string(name) + " is not set; " + kRequired);
}

// Reads an integer variable into *out when set; `required` turns absence into an error.
Status ReadInt(const EnvLookup& env, const char* name, int64_t min, int64_t max, bool required,
               int* out) {
  const char* v = env(name);
  if (v == nullptr) return required ? Missing(name) : OkStatus();
  auto parsed = ParseInt(name, v, min, max);
  if (!parsed.ok()) return parsed.status();
  *out = static_cast<int>(*parsed);
  return OkStatus();
}

Status ReadBool(const EnvLookup& env, const char* name, bool* out) {
  const char* v = env(name);
  if (v == nullptr) return OkStatus();
  auto parsed = ParseBool(name, v);
  if (!parsed.ok()) return parsed.status();
  *out = *parsed;
  return OkStatus();
}

}  // namespace

Result<Options> OptionsFromEnv(const EnvLookup& env) {
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
  const char* uri = env("DMLC_PS_ROOT_URI");
  if (uri == nullptr) return Missing("DMLC_PS_ROOT_URI");
  o.root_uri = uri;
  MESHPOST_RETURN_IF_ERROR(ReadInt(env, "DMLC_PS_ROOT_PORT", 0, 65535, true, &o.root_port));
  MESHPOST_RETURN_IF_ERROR(ReadInt(env, "DMLC_NUM_WORKER", 1, 4096, true, &o.num_workers));
  MESHPOST_RETURN_IF_ERROR(ReadInt(env, "DMLC_NUM_SERVER", 1, 4096, true, &o.num_servers));
  MESHPOST_RETURN_IF_ERROR(ReadInt(env, "DMLC_GROUP_SIZE", 1, 4096, false, &o.group_size));
  MESHPOST_RETURN_IF_ERROR(ReadInt(env, "DMLC_NODE_RANK", 0, 4095, false, &o.node_rank));
  // StepMesh names the instance STEPMESH_GPU; DMLC_INSTANCE_ID is the neutral alias.
  MESHPOST_RETURN_IF_ERROR(ReadInt(env, "DMLC_INSTANCE_ID", 0, 4095, false, &o.instance));
  MESHPOST_RETURN_IF_ERROR(ReadInt(env, "STEPMESH_GPU", 0, 4095, false, &o.instance));
  if (const char* v = env("DMLC_NODE_HOST")) o.node_host = v;
  if (const char* v = env("DMLC_INTERFACE")) o.interface = v;
  MESHPOST_RETURN_IF_ERROR(ReadInt(env, "DMLC_PORT", 0, 65535, false, &o.port));
  MESHPOST_RETURN_IF_ERROR(ReadInt(env, "PS_VERBOSE", 0, 2, false, &o.verbose));
  MESHPOST_RETURN_IF_ERROR(ReadBool(env, "DMLC_ENABLE_RDMA", &o.enable_rdma));
  if (const char* v = env("MESHPOST_TRANSPORT")) o.transport = v;
  MESHPOST_RETURN_IF_ERROR(ReadInt(env, "MESHPOST_HEARTBEAT_INTERVAL_MS", 10, 600000, false,
                                   &o.heartbeat_interval_ms));
  MESHPOST_RETURN_IF_ERROR(ReadInt(env, "MESHPOST_HEARTBEAT_TIMEOUT_MS", 50, 3600000, false,
                                   &o.heartbeat_timeout_ms));
  int spin = static_cast<int>(o.spin_us);
  MESHPOST_RETURN_IF_ERROR(ReadInt(env, "MESHPOST_SPIN_US", 0, 10000000, false, &spin));
  o.spin_us = spin;
  MESHPOST_RETURN_IF_ERROR(ReadBool(env, "MESHPOST_BUSY_POLL", &o.busy_poll));
  MESHPOST_RETURN_IF_ERROR(ReadBool(env, "MESHPOST_CMA_DISABLE", &o.cma_disable));
  MESHPOST_RETURN_IF_ERROR(
      ReadInt(env, "MESHPOST_START_TIMEOUT_MS", 100, INT_MAX, false, &o.start_timeout_ms));
  MESHPOST_RETURN_IF_ERROR(
      ReadInt(env, "MESHPOST_MAX_INFLIGHT", 1, 1 << 20, false, &o.max_inflight));
  MESHPOST_RETURN_IF_ERROR(ReadInt(env, "MESHPOST_PORT_FD", 0, 1 << 20, false, &o.port_fd));
  MESHPOST_RETURN_IF_ERROR(ReadTraceOptions(env, &o.trace));  // MESHPOST_TRACE*
  MESHPOST_RETURN_IF_ERROR(o.Validate());
  return o;
}

Status Options::Validate() const {
  auto bad = [](const std::string& field, const std::string& value, const std::string& want) {
    return InvalidArgumentError("option " + field + "=" + value + " is invalid; expected " +
                                want);
  };
  if (root_uri.empty()) return bad("root_uri (DMLC_PS_ROOT_URI)", "''", "a host name or IP");
  if (root_port < 0 || root_port > 65535) {
    return bad("root_port (DMLC_PS_ROOT_PORT)", std::to_string(root_port), "0..65535");
  }
  if (root_port == 0 && role != Role::kScheduler) {
    return bad("root_port (DMLC_PS_ROOT_PORT)", "0",
               "the scheduler's port (only the scheduler may use 0 to pick a free port)");
  }
  if (num_workers < 1) return bad("num_workers (DMLC_NUM_WORKER)", std::to_string(num_workers), ">= 1");
  if (num_servers < 1) return bad("num_servers (DMLC_NUM_SERVER)", std::to_string(num_servers), ">= 1");
  if (group_size < 1) return bad("group_size (DMLC_GROUP_SIZE)", std::to_string(group_size), ">= 1");
  if (instance < 0 || instance >= group_size) {
    return bad("instance (STEPMESH_GPU / DMLC_INSTANCE_ID)", std::to_string(instance),
               "0 <= instance < DMLC_GROUP_SIZE=" + std::to_string(group_size));
  }
  if (node_rank < 0) return bad("node_rank (DMLC_NODE_RANK)", std::to_string(node_rank), ">= 0");
  if (role != Role::kScheduler) {
    const int count = role == Role::kServer ? num_servers : num_workers;
    if (Rank() >= count) {
      return bad(std::string(RoleName(role)) + " rank (DMLC_NODE_RANK * DMLC_GROUP_SIZE + instance)",
                 std::to_string(Rank()),
                 "< " + std::to_string(count) + " (DMLC_NUM_" +
                     (role == Role::kServer ? "SERVER" : "WORKER") + ")");
    }
  }
  if (port < 0 || port > 65535) return bad("port (DMLC_PORT)", std::to_string(port), "0..65535");
  if (verbose < 0 || verbose > 2) return bad("verbose (PS_VERBOSE)", std::to_string(verbose), "0, 1 or 2");
  if (transport != "auto" && !IsKnownTransport(transport)) {
    return bad("transport (MESHPOST_TRANSPORT)", "'" + transport + "'",
               "auto, " + KnownTransportNames());
  }
  if (enable_rdma && transport != "auto" && transport != "rdma") {
    return bad("transport (MESHPOST_TRANSPORT)", "'" + transport + "'",
               "auto or rdma when DMLC_ENABLE_RDMA=1");
  }
  if (heartbeat_interval_ms < 10) {
    return bad("heartbeat_interval_ms", std::to_string(heartbeat_interval_ms), ">= 10");
  }
  if (heartbeat_timeout_ms < 2 * heartbeat_interval_ms) {
    return bad("heartbeat_timeout_ms (MESHPOST_HEARTBEAT_TIMEOUT_MS)",
               std::to_string(heartbeat_timeout_ms),
               ">= 2 * heartbeat_interval_ms = " + std::to_string(2 * heartbeat_interval_ms));
  }
  if (spin_us < 0) return bad("spin_us (MESHPOST_SPIN_US)", std::to_string(spin_us), ">= 0");
  if (start_timeout_ms < 100) return bad("start_timeout_ms", std::to_string(start_timeout_ms), ">= 100");
  if (max_inflight < 1) return bad("max_inflight", std::to_string(max_inflight), ">= 1");
  MESHPOST_RETURN_IF_ERROR(ValidateTraceOptions(trace));
  return OkStatus();
}

}  // namespace meshpost
