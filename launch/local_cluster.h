// LocalCluster starts a whole meshpost cluster on this machine as separate processes:
// the scheduler first on an OS-assigned port (it reports the port through a pipe), then
// every server and worker with the DMLC_* variables set. Used by the demo and by the
// multi-process tests; processes are tracked and killed by pid, never by name.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "common/result.h"

namespace meshpost {

// The port-pipe protocol (MESHPOST_PORT_FD): a scheduler started on port 0 writes the port
// it bound as one decimal line to an inherited descriptor. Reads that line from `fd`
// within timeout_ms; Unavailable when the writer closed first or wrote junk,
// DeadlineExceeded when nothing came in time. Does not close `fd`.
Result<int> ReadReportedPort(int fd, int64_t timeout_ms);

struct ClusterSpec {
  std::vector<std::string> argv;  // program + args run for every role
  int num_workers = 2;
  int num_servers = 2;
  std::map<std::string, std::string> env;  // extra variables for every process
  // Per-process extra variables, keyed "server:1", "worker:0", "scheduler".
  std::map<std::string, std::map<std::string, std::string>> env_for;
  int64_t start_timeout_ms = 30000;  // for the scheduler to report its port
};

struct ProcessExit {
  std::string name;  // "worker:1"
  pid_t pid = 0;
  bool exited = false;  // false: still running when the wait timed out (then killed)
  int exit_code = -1;   // when exited normally
  int signal = 0;       // when killed by a signal
  bool ok() const { return exited && signal == 0 && exit_code == 0; }
  std::string Describe() const;
};

class LocalCluster {
 public:
  LocalCluster() = default;
  ~LocalCluster();  // kills whatever still runs
  LocalCluster(LocalCluster&&) = default;
  LocalCluster& operator=(LocalCluster&&) = default;

  Status Start(const ClusterSpec& spec);
  // Waits for every process; on timeout kills the rest with SIGKILL. One entry per process.
  std::vector<ProcessExit> WaitAll(int64_t timeout_ms);
  void KillAll();
  int port() const { return port_; }
  pid_t pid(const std::string& name) const;

 private:
  Result<pid_t> Spawn(const std::string& name, const std::map<std::string, std::string>& env,
                      int keep_fd);
  std::vector<std::string> argv_;
  std::vector<std::pair<std::string, pid_t>> procs_;
  int port_ = 0;
};

}  // namespace meshpost
