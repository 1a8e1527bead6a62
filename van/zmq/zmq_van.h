// ZeroMQ TCP van: works between any two hosts; the control plane of every node and the
// data transport where nothing better fits. name() is "tcp"; Bind takes a real TCP port.
#pragma once

#include <memory>

#include "van/van.h"

namespace meshpost {

std::unique_ptr<Van> CreateZmqVan(const VanOptions& options);

}  // namespace meshpost
