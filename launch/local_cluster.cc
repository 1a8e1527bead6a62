#include "launch/local_cluster.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "common/auth.h"
#include "common/clock.h"

extern char** environ;

namespace meshpost {
namespace {

int PidFd(pid_t pid) { return static_cast<int>(syscall(SYS_pidfd_open, pid, 0)); }

}  // namespace

std::string ProcessExit::Describe() const {
  if (!exited) return name + " (pid " + std::to_string(pid) + ") did not finish in time";
  if (signal)
    return name + " (pid " + std::to_string(pid) + ") killed by signal " + std::to_string(signal);
  return name + " (pid " + std::to_string(pid) + ") exited with " + std::to_string(exit_code);
}

LocalCluster::~LocalCluster() { KillAll(); }

Result<pid_t> LocalCluster::Spawn(const std::string& name,
                                  const std::map<std::string, std::string>& env, int keep_fd) {
  std::map<std::string, std::string> merged;
  for (char** e = environ; *e; ++e) {
    const char* eq = std::strchr(*e, '=');
    if (eq) merged[std::string(static_cast<const char*>(*e), eq)] = eq + 1;
  }
  for (const auto& [k, v] : env) merged[k] = v;
  std::vector<std::string> env_strings;
  for (const auto& [k, v] : merged) env_strings.push_back(k + "=" + v);
  std::vector<char*> envp, argv;
  for (auto& s : env_strings) envp.push_back(s.data());
  envp.push_back(nullptr);
  for (auto& s : argv_) argv.push_back(s.data());
  argv.push_back(nullptr);
  pid_t pid = fork();
  if (pid < 0) return UnavailableError(std::string("fork: ") + std::strerror(errno));
  if (pid == 0) {
    // Child: die with the parent so a killed test leaves no orphans behind.
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    signal(SIGPIPE, SIG_DFL);
    // Inherit nothing but stdio and, for the scheduler, the pipe it reports its port on.
    for (int fd = 3; fd < 1024; ++fd) {
      if (fd != keep_fd) close(fd);
    }
    execve(argv[0], argv.data(), envp.data());
    std::fprintf(stderr, "execve %s failed: %s\n", argv[0], std::strerror(errno));
    _exit(127);
  }
  procs_.emplace_back(name, pid);
  return pid;
}

Result<int> ReadReportedPort(int fd, int64_t timeout_ms) {
  std::string line;
  const uint64_t deadline = DeadlineFromTimeoutMs(timeout_ms);
  while (line.find('\n') == std::string::npos) {
    const uint64_t now = GetNanosecond();
    if (now >= deadline) {
      return DeadlineExceededError("no port reported on descriptor " + std::to_string(fd) +
                                   " within " + std::to_string(timeout_ms) + " ms");
    }
    pollfd p{fd, POLLIN, 0};
    const int rc =
        poll(&p, 1, static_cast<int>(std::min<uint64_t>((deadline - now) / 1000000 + 1, 1000)));
    if (rc < 0 && errno != EINTR)
      return UnavailableError(std::string("poll: ") + std::strerror(errno));
    if (rc <= 0) continue;
    char buf[32];
    const ssize_t n = read(fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      return UnavailableError("the port pipe closed before a port was written (got '" + line +
                              "')");
    }
    line.append(buf, static_cast<size_t>(n));
    if (line.size() > 16) return UnavailableError("port pipe carries junk: '" + line + "'");
  }
  char* end = nullptr;
  const long port = std::strtol(line.c_str(), &end, 10);
  if (end == line.c_str() || *end != '\n' || port <= 0 || port > 65535) {
    return UnavailableError("port pipe carries '" + line.substr(0, line.find('\n')) +
                            "'; expected a port in 1..65535");
  }
  return static_cast<int>(port);
}

Status LocalCluster::Start(const ClusterSpec& spec) {
  if (spec.argv.empty()) return InvalidArgumentError("LocalCluster: argv is empty");
  argv_ = spec.argv;
  // Every cluster gets its own secret unless the caller chose one (or chose none by
  // setting MESHPOST_CLUSTER_TOKEN to ""), so a local cluster is never open to other
  // local users' processes (docs/security.md).
  std::string token;
  const bool token_chosen = spec.env.count("MESHPOST_CLUSTER_TOKEN") ||
                            spec.env.count("MESHPOST_CLUSTER_TOKEN_FILE") ||
                            std::getenv("MESHPOST_CLUSTER_TOKEN") != nullptr ||
                            std::getenv("MESHPOST_CLUSTER_TOKEN_FILE") != nullptr;
  if (!token_chosen) token = GenerateClusterToken();
  auto env_for = [&](const std::string& name) {
    std::map<std::string, std::string> env = spec.env;
    if (!token.empty()) env["MESHPOST_CLUSTER_TOKEN"] = token;
    env["DMLC_NUM_WORKER"] = std::to_string(spec.num_workers);
    env["DMLC_NUM_SERVER"] = std::to_string(spec.num_servers);
    env["DMLC_PS_ROOT_URI"] = "127.0.0.1";
    auto it = spec.env_for.find(name);
    if (it != spec.env_for.end()) {
      for (const auto& [k, v] : it->second) env[k] = v;
    }
    return env;
  };

  int fds[2];
  if (pipe(fds) != 0) return UnavailableError(std::string("pipe: ") + std::strerror(errno));
  auto env = env_for("scheduler");
  env["DMLC_ROLE"] = "scheduler";
  env["DMLC_PS_ROOT_PORT"] = "0";
  env["MESHPOST_PORT_FD"] = std::to_string(fds[1]);
  auto sched = Spawn("scheduler", env, fds[1]);
  close(fds[1]);
  if (!sched.ok()) {
    close(fds[0]);
    return sched.status();
  }
  auto port = ReadReportedPort(fds[0], spec.start_timeout_ms);
  close(fds[0]);
  if (!port.ok()) {
    KillAll();
    return port.status().Annotate("LocalCluster: the scheduler did not report its port");
  }
  port_ = *port;
  for (int role = 0; role < 2; ++role) {
    const bool server = role == 0;
    const int count = server ? spec.num_servers : spec.num_workers;
    for (int r = 0; r < count; ++r) {
      const std::string name = std::string(server ? "server:" : "worker:") + std::to_string(r);
      auto e = env_for(name);
      e["DMLC_ROLE"] = server ? "server" : "worker";
      e["DMLC_PS_ROOT_PORT"] = std::to_string(port_);
      if (!e.count("DMLC_NODE_RANK")) e["DMLC_NODE_RANK"] = std::to_string(r);
      auto pid = Spawn(name, e, -1);
      if (!pid.ok()) {
        KillAll();
        return pid.status();
      }
    }
  }
  return OkStatus();
}

std::vector<ProcessExit> LocalCluster::WaitAll(int64_t timeout_ms) {
  std::vector<ProcessExit> exits;
  const uint64_t deadline = DeadlineFromTimeoutMs(timeout_ms);
  for (auto& [name, pid] : procs_) {
    ProcessExit e;
    e.name = name;
    e.pid = pid;
    int fd = PidFd(pid);
    for (;;) {
      int status = 0;
      pid_t r = waitpid(pid, &status, WNOHANG);
      if (r == pid) {
        e.exited = true;
        if (WIFEXITED(status)) e.exit_code = WEXITSTATUS(status);
        if (WIFSIGNALED(status)) e.signal = WTERMSIG(status);
        break;
      }
      const uint64_t now = GetNanosecond();
      if (r < 0 || now >= deadline) {
        kill(pid, SIGKILL);
        waitpid(pid, &status, 0);
        break;
      }
      if (fd >= 0) {
        pollfd p{fd, POLLIN, 0};
        poll(&p, 1, static_cast<int>(std::min<uint64_t>((deadline - now) / 1000000 + 1, 1000)));
      } else {
        usleep(1000);  // no pidfd (kernel < 5.3): fall back to a short poll interval
      }
    }
    if (fd >= 0) close(fd);
    exits.push_back(e);
    pid = 0;
  }
  procs_.clear();
  return exits;
}

void LocalCluster::KillAll() {
  for (auto& [name, pid] : procs_) {
    if (pid > 0) {
      kill(pid, SIGKILL);
      int status;
      waitpid(pid, &status, 0);
    }
  }
  procs_.clear();
}

pid_t LocalCluster::pid(const std::string& name) const {
  for (const auto& [n, p] : procs_) {
    if (n == name) return p;
  }
  return 0;
}

}  // namespace meshpost
