// libFuzzer target: the RDMA van's rendezvous blobs and header frames (van/rdma/rdma_wire),
// which arrive over the control plane and the header ring from the peer.
#include <cstddef>
#include <cstdint>

#include "van/rdma/rdma_wire.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace meshpost::rdma;
  if (size == 0) return 0;
  if (data[0] & 1) {
    auto blob = DecodeBlob(data + 1, size - 1);
    (void)blob;
  } else {
    auto frame = DecodeHeaderFrame(data + 1, size - 1);
    (void)frame;
  }
  return 0;
}
