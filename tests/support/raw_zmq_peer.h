// A raw ZeroMQ DEALER connected to a tcp van, for tests that play a hostile or buggy peer:
// it sends exactly the frames it is given, without ZmqVan::Send's checks and without the
// cluster-token handshake. Linger 0, so closing never waits for frames nobody reads.
#pragma once

#include <zmq.h>

#include <string>
#include <vector>

#include "van/codec.h"
#include "van/message.h"

namespace meshpost {
namespace support {

class RawZmqPeer {
 public:
  // Connects to the van listening on 127.0.0.1:`port`.
  explicit RawZmqPeer(int port) : RawZmqPeer("tcp://127.0.0.1:" + std::to_string(port)) {}
  explicit RawZmqPeer(const std::string& endpoint) : ctx_(zmq_ctx_new()) {
    sock_ = zmq_socket(ctx_, ZMQ_DEALER);
    int zero = 0;
    zmq_setsockopt(sock_, ZMQ_LINGER, &zero, sizeof(zero));
    connected_ = zmq_connect(sock_, endpoint.c_str()) == 0;
  }
  ~RawZmqPeer() {
    zmq_close(sock_);
    zmq_ctx_term(ctx_);
  }
  RawZmqPeer(const RawZmqPeer&) = delete;
  RawZmqPeer& operator=(const RawZmqPeer&) = delete;

  bool connected() const { return connected_; }

  // One message of one frame (any bytes: an encoded Meta, an auth frame, garbage).
  bool Send(const std::string& frame) {
    return zmq_send(sock_, frame.data(), frame.size(), 0) >= 0;
  }
  // One message: `meta` encoded as the header frame, then one frame per entry of `data`.
  bool Send(const Meta& meta, const std::vector<std::vector<char>>& data) {
    const std::string header = EncodeMeta(meta);
    if (zmq_send(sock_, header.data(), header.size(), data.empty() ? 0 : ZMQ_SNDMORE) < 0) {
      return false;
    }
    for (size_t i = 0; i < data.size(); ++i) {
      if (zmq_send(sock_, data[i].data(), data[i].size(), i + 1 < data.size() ? ZMQ_SNDMORE : 0) <
          0) {
        return false;
      }
    }
    return true;
  }

 private:
  void* ctx_;
  void* sock_ = nullptr;
  bool connected_ = false;
};

}  // namespace support
}  // namespace meshpost
