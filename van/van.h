// The transport interface. A Van moves OutMessages to peer nodes and hands InMessages to
// a VanReceiver on its own receive thread. Before copying a data segment, the van asks the
// receiver where it should land (registered memory), so one-sided transports (same-host
// CMA, RDMA) and copy-at-receiver transports (ZeroMQ TCP) share one contract.
#pragma once

#include <memory>
#include <string>

#include "common/result.h"
#include "common/waiter.h"
#include "van/message.h"

namespace meshpost {

struct PeerAddress {
  int id = -1;
  std::string host;      // TCP host (zmq van)
  int port = 0;          // TCP port (zmq van)
  std::string endpoint;  // the peer van's endpoint() string (non-TCP vans)
  int pid = 0;           // peer process id (same-host vans)
};

class VanReceiver {
 public:
  virtual ~VanReceiver() = default;
  // Destination for data segment `index` of an incoming message whose meta decoded fine.
  // Returns a pointer to at least meta.data[index].nbytes writable bytes, or nullptr to
  // let the van keep the bytes in its own buffer. An error drops the message and is
  // reported through OnDropped.
  virtual Result<void*> Destination(const Meta& meta, size_t index) = 0;
  // A complete message; called on the van's receive thread.
  virtual void OnMessage(InMessage&& msg) = 0;
  // A message whose header decoded but whose payload was refused (why says how).
  virtual void OnDropped(const Meta& meta, const Status& why) = 0;
};

struct VanOptions {
  WaitPolicy wait;           // receive-thread spin/block policy
  int io_threads = 1;        // ZeroMQ I/O threads
  size_t zero_copy_min = 4096;  // smaller segments are copied into the frame
  // Same-host (cma) van: never use cross-memory attach, always the shared-memory copy
  // path (the automatic fallback where CMA is refused; set to test it).
  bool cma_disable = false;
  int64_t connect_timeout_ms = 10'000;  // cma van: Connect handshake deadline
};

class Van {
 public:
  virtual ~Van() = default;
  virtual const char* name() const = 0;
  // Binds the receive endpoint on host:port (port 0 picks a free port); returns the port.
  virtual Result<int> Bind(const std::string& host, int port) = 0;
  // Opaque address peers pass back in PeerAddress::endpoint to Connect; valid after Bind.
  virtual std::string endpoint() const = 0;
  // Starts the receive thread delivering to `receiver` (which must outlive Stop()).
  virtual Status Start(VanReceiver* receiver) = 0;
  virtual Status Connect(const PeerAddress& peer) = 0;
  virtual void Disconnect(int peer_id) = 0;
  // Sends to msg.meta.recipient; thread-safe. Segments are read after return only through
  // their owners (zero-copy); without an owner the caller keeps the memory valid until
  // the request that carries it completes.
  virtual Status Send(OutMessage&& msg) = 0;
  // Stops the receive thread and closes every socket; idempotent.
  virtual void Stop() = 0;
  // The mechanism used towards a connected peer (e.g. "cma" or "cma-shm" for the
  // same-host van when CMA is refused); name() unless a van distinguishes.
  virtual std::string PeerTransport(int peer_id) const { return name(); }
};

std::unique_ptr<Van> CreateZmqVan(const VanOptions& options);

}  // namespace meshpost
