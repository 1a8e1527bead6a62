// Two same-host (cma) vans in this process, bound, started and connected both ways: the
// set-up the cma van tests share. ASSERTs inside; a fatal failure in a fixture's SetUp
// skips the test body.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <memory>

#include "van/cma/cma_van.h"
#include "van/van.h"

namespace meshpost {
namespace support {

inline void StartConnectedCmaPair(const VanOptions& options_a, const VanOptions& options_b,
                                  int id_a, int id_b, VanReceiver* ra, VanReceiver* rb,
                                  std::unique_ptr<Van>* a, std::unique_ptr<Van>* b) {
  *a = CreateCmaVan(options_a);
  *b = CreateCmaVan(options_b);
  ASSERT_TRUE((*a)->Bind("", 0).ok());
  ASSERT_TRUE((*b)->Bind("", 0).ok());
  ASSERT_TRUE((*a)->Start(ra).ok());
  ASSERT_TRUE((*b)->Start(rb).ok());
  ASSERT_TRUE((*a)->Connect({id_b, "", 0, (*b)->endpoint(), getpid()}).ok());
  ASSERT_TRUE((*b)->Connect({id_a, "", 0, (*a)->endpoint(), getpid()}).ok());
}

}  // namespace support
}  // namespace meshpost
