// Cheap logging: a disabled line costs a level check and nothing else; its arguments are
// not even evaluated. An enabled line still reaches its logger.
#include "common/logging.h"

#include <gtest/gtest.h>

namespace meshpost {
namespace {

int g_evaluated = 0;
int Expensive() { return ++g_evaluated; }

TEST(LoggingTest, DisabledLinesDoNotEvaluateTheirArguments) {
  ConfigureLogging("logging_test", 0);
  g_evaluated = 0;
  for (int i = 0; i < 1000; ++i) {
    MP_LOG_TRACE("common", "value {}", Expensive());
    MP_LOG_DEBUG("common", "value {}", Expensive());
  }
  EXPECT_EQ(g_evaluated, 0);
  EXPECT_FALSE(log_internal::Enabled(spdlog::level::trace));
  EXPECT_TRUE(log_internal::Enabled(spdlog::level::info));
}

TEST(LoggingTest, EnabledLinesReachTheLoggerAtEveryLevelChange) {
  ConfigureLogging("logging_test", 2);
  g_evaluated = 0;
  MP_LOG_TRACE("common", "value {}", Expensive());
  EXPECT_EQ(g_evaluated, 1);
  EXPECT_TRUE(Log("common").should_log(spdlog::level::trace));
  ConfigureLogging("logging_test", 1);
  MP_LOG_TRACE("common", "value {}", Expensive());
  MP_LOG_DEBUG("common", "value {}", Expensive());
  EXPECT_EQ(g_evaluated, 2);
  ConfigureLogging("logging_test", 0);
  MP_LOG_DEBUG("common", "value {}", Expensive());
  EXPECT_EQ(g_evaluated, 2);
}

}  // namespace
}  // namespace meshpost
