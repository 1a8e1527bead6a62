// Device code of the CUDA backend: flag writes/waits and a sequence counter, one thread
// each. Compiled by nvcc into a fatbin (sm_80, sm_89, sm_90 + PTX) that the backend loads
// through the driver at first use, so meshpost never links the CUDA runtime. These are
// ordinary kernel launches, hence capturable in CUDA Graphs.

// The value an op uses: *value_addr when given (a device counter advanced by
// meshpost_seq_add_one, so graph replays see the current sequence number), else `value`.
__device__ __forceinline__ long long Target(const long long* value_addr, long long value) {
  return value_addr ? *reinterpret_cast<const volatile long long*>(value_addr) : value;
}

extern "C" __global__ void meshpost_write_flag(long long* flag, const long long* value_addr,
                                                long long value) {
  const long long v = Target(value_addr, value);
  // Everything this stream wrote before (kernels, copies) must be visible to the host and
  // peers before the flag: a system-scope fence, then a volatile store.
  __threadfence_system();
  *reinterpret_cast<volatile long long*>(flag) = v;
}

extern "C" __global__ void meshpost_wait_flag(const long long* flag, const long long* value_addr,
                                               long long value) {
  const long long target = Target(value_addr, value);
  const volatile long long* f = flag;
  unsigned ns = 32;
  // The host (or a peer) writes the flag through mapped memory: reload through volatile,
  // back off so one spinning thread does not starve the SM's other warps.
  while (*f < target) {
    __nanosleep(ns);
    if (ns < 1024) ns *= 2;
  }
  // Reads after the wait must not be satisfied before the flag was seen.
  __threadfence_system();
}

extern "C" __global__ void meshpost_seq_add_one(long long* counter) { *counter += 1; }
