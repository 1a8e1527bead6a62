// The one VanReceiver recorder the van tests share: records messages, drops and peer
// failures, lets the test choose destinations (by key, by function, or refuse), carries
// rendezvous blobs through a test-supplied function, and notices a callback that runs
// inline on a thread that is inside a van call (OwnerCallScope), which the Van contract
// forbids (docs/threads.md).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "van/van.h"

namespace meshpost {
namespace support {

// Marks the current thread as inside a call to a van (Send, Connect, ...): a receiver
// callback that runs while a scope is open on the same thread ran inline.
class OwnerCallScope {
 public:
  OwnerCallScope() { ++depth(); }
  ~OwnerCallScope() { --depth(); }
  OwnerCallScope(const OwnerCallScope&) = delete;
  OwnerCallScope& operator=(const OwnerCallScope&) = delete;
  static bool active() { return depth() > 0; }

 private:
  static int& depth() {
    thread_local int d = 0;
    return d;
  }
};

class RecordingReceiver : public VanReceiver {
 public:
  using DestinationFn = std::function<Result<void*>(const Meta&, size_t)>;
  using RendezvousFn = std::function<Status(const char* van, int peer, std::string blob)>;

  static constexpr std::chrono::seconds kDefaultTimeout{60};

  // Configuration: set before traffic flows.
  void set_destination(DestinationFn fn) {
    std::lock_guard<std::mutex> lock(mu_);
    destination_ = std::move(fn);
  }
  void set_rendezvous(RendezvousFn fn) {
    std::lock_guard<std::mutex> lock(mu_);
    rendezvous_ = std::move(fn);
  }
  // Segments of `key` land at `where` (else in a van buffer); safe while traffic flows.
  void land(int64_t key, void* where) {
    std::lock_guard<std::mutex> lock(mu_);
    destinations[key] = where;
  }
  std::map<int64_t, void*> destinations;  // key → where its segments land (else van buffer)
  std::atomic<bool> refuse{false};        // every Destination fails (may flip mid-test)

  // Runs under the recorder's lock: that orders the van's write into a destination after
  // the test's last WaitFor/Take*, which a race detector cannot see through the network.
  Result<void*> Destination(const Meta& meta, size_t index) override {
    NoteCallback();
    std::lock_guard<std::mutex> lock(mu_);
    if (destination_) return destination_(meta, index);
    if (refuse.load()) return InvalidArgumentError("test receiver refuses");
    auto it = destinations.find(meta.data[index].key);
    return it == destinations.end() ? nullptr : it->second;
  }
  void OnMessage(InMessage&& msg) override {
    NoteCallback();
    std::lock_guard<std::mutex> lock(mu_);
    messages.push_back(std::move(msg));
    cv_.notify_all();
  }
  void OnDropped(const Meta& meta, const Status& why) override {
    NoteCallback();
    std::lock_guard<std::mutex> lock(mu_);
    dropped.emplace_back(meta, why);
    cv_.notify_all();
  }
  void OnPeerFailure(int peer_id, const Status& why) override {
    NoteCallback();
    std::lock_guard<std::mutex> lock(mu_);
    failures.emplace_back(peer_id, why);
    cv_.notify_all();
  }
  Status SendRendezvous(const char* van, int peer_id, std::string blob) override {
    RendezvousFn fn;
    {
      std::lock_guard<std::mutex> lock(mu_);
      fn = rendezvous_;
    }
    if (!fn) return VanReceiver::SendRendezvous(van, peer_id, std::move(blob));
    return fn(van, peer_id, std::move(blob));
  }

  // True once at least `n_messages` messages and `n_dropped` drops arrived.
  bool WaitFor(size_t n_messages, size_t n_dropped = 0,
               std::chrono::seconds timeout = kDefaultTimeout) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, timeout, [&] {
      return messages.size() >= n_messages && dropped.size() >= n_dropped;
    });
  }
  bool WaitForFailures(size_t n, std::chrono::seconds timeout = kDefaultTimeout) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, timeout, [&] { return failures.size() >= n; });
  }
  std::vector<InMessage> TakeMessages() {
    std::lock_guard<std::mutex> lock(mu_);
    return std::exchange(messages, {});
  }
  std::vector<std::pair<Meta, Status>> TakeDropped() {
    std::lock_guard<std::mutex> lock(mu_);
    return std::exchange(dropped, {});
  }
  // Callbacks that ran on a thread inside an OwnerCallScope (must stay 0).
  int inline_callbacks() const { return inline_callbacks_.load(); }

  // Recorded; lock-free access only when no van thread can deliver (tests that drive a
  // transport by hand), else use WaitFor / Take*.
  std::vector<InMessage> messages;
  std::vector<std::pair<Meta, Status>> dropped;
  std::vector<std::pair<int, Status>> failures;

 private:
  void NoteCallback() {
    if (OwnerCallScope::active()) inline_callbacks_.fetch_add(1);
  }

  mutable std::mutex mu_;
  std::condition_variable cv_;
  DestinationFn destination_;
  RendezvousFn rendezvous_;
  std::atomic<int> inline_callbacks_{0};
};

}  // namespace support
}  // namespace meshpost
