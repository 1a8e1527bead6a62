#include "common/affinity.h"

#include <pthread.h>
#include <sched.h>

#include <cstring>

#include "common/logging.h"

namespace meshpost {

int CorePinner::PinCurrentThread(const char* thread_name) {
  if (!enabled_ || gave_up_.load(std::memory_order_relaxed)) return -1;
  const int core = next_.fetch_add(1, std::memory_order_relaxed);
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  // The process's allowed set, not the machine's core count: under taskset, cgroups or
  // numactl a core that exists may still be forbidden.
  const bool known = sched_getaffinity(0, sizeof(allowed), &allowed) == 0;
  const bool usable = known && core >= 0 && core < CPU_SETSIZE && CPU_ISSET(core, &allowed);
  int err = 0;
  if (usable) {
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(core, &one);
    err = pthread_setaffinity_np(pthread_self(), sizeof(one), &one);
    if (err == 0) {
      MP_LOG_DEBUG("common", "thread {} pinned to core {} (STEPMESH_BIND_CPU_CORE)", thread_name,
                   core);
      return core;
    }
  }
  gave_up_.store(true, std::memory_order_relaxed);
  std::call_once(warned_, [&] {
    const int count = known ? CPU_COUNT(&allowed) : 0;
    MP_LOG_WARN("common",
                "STEPMESH_BIND_CPU_CORE=1: core {} (for thread {}; STEPMESH_CPU_START_OFFSET) is "
                "{}; this process may run on {} core(s); meshpost's threads are not pinned",
                core, thread_name,
                usable ? std::string("refused: ") + std::strerror(err) : "not available", count);
  });
  return -1;
}

}  // namespace meshpost
