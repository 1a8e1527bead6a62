// Caller-driven progress (issue 11, docs/threads.md): a thread that is about to block until
// a message arrives can lend itself to the transport instead, and receive and deliver that
// message itself. A round trip then costs one thread wake-up per side (the waiting caller's)
// instead of two (the van's receive thread, then the caller). Waiter (common/waiter.h) uses
// an engine when its owner gives it one; vans implement it (Van::BeginProgress ...).
#pragma once

#include <cstdint>

namespace meshpost {

class ProgressEngine {
 public:
  virtual ~ProgressEngine() = default;
  // Makes the calling thread the one that receives and delivers messages until End().
  // False when progress cannot be lent now: another thread holds it, no peer is reached
  // through a transport that supports it, or the transport is stopping. The caller then
  // waits the ordinary way (its notification comes from the transport's own thread).
  virtual bool Begin() = 0;
  // Waits for incoming messages until deadline_ns (GetNanosecond clock; 0 = only poll) or
  // Wake(), and delivers what arrived on this thread (VanReceiver callbacks run here).
  // Returns false when the transport is stopping: the caller must call End() and wait the
  // ordinary way.
  virtual bool Progress(uint64_t deadline_ns) = 0;
  virtual void End() = 0;
  // Something the thread inside Progress may be waiting for happened elsewhere (delivered
  // by another transport's thread): makes its Progress return. Cheap when nobody is inside.
  virtual void Wake() = 0;
};

}  // namespace meshpost
