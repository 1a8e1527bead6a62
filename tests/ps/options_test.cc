#include "ps/options.h"

#include <gtest/gtest.h>

#include <map>

namespace meshpost {
namespace {

struct FakeEnv {
  std::map<std::string, std::string> vars = {{"DMLC_ROLE", "worker"},
                                             {"DMLC_PS_ROOT_URI", "10.0.0.1"},
                                             {"DMLC_PS_ROOT_PORT", "9000"},
                                             {"DMLC_NUM_WORKER", "4"},
                                             {"DMLC_NUM_SERVER", "2"}};
  EnvLookup fn() {
    return [this](const char* name) -> const char* {
      auto it = vars.find(name);
      return it == vars.end() ? nullptr : it->second.c_str();
    };
  }
};

TEST(OptionsTest, ParsesTheLaunchVariables) {
  FakeEnv env;
  env.vars["DMLC_GROUP_SIZE"] = "2";
  env.vars["DMLC_NODE_RANK"] = "1";
  env.vars["STEPMESH_GPU"] = "1";
  env.vars["PS_VERBOSE"] = "2";
  env.vars["DMLC_PORT"] = "1234";
  env.vars["DMLC_NODE_HOST"] = "10.0.0.7";
  env.vars["MESHPOST_BUSY_POLL"] = "1";
  auto o = OptionsFromEnv(env.fn());
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->role, Role::kWorker);
  EXPECT_EQ(o->root_uri, "10.0.0.1");
  EXPECT_EQ(o->root_port, 9000);
  EXPECT_EQ(o->num_workers, 4);
  EXPECT_EQ(o->num_servers, 2);
  EXPECT_EQ(o->Rank(), 3);  // node_rank * group_size + instance
  EXPECT_EQ(o->verbose, 2);
  EXPECT_EQ(o->port, 1234);
  EXPECT_EQ(o->node_host, "10.0.0.7");
  EXPECT_TRUE(o->busy_poll);
  EXPECT_EQ(o->heartbeat_interval_ms, 1000);  // default
}

TEST(OptionsTest, MissingVariableListsWhatIsRequired) {
  for (const char* name : {"DMLC_ROLE", "DMLC_PS_ROOT_URI", "DMLC_PS_ROOT_PORT", "DMLC_NUM_WORKER",
                           "DMLC_NUM_SERVER"}) {
    FakeEnv env;
    env.vars.erase(name);
    auto o = OptionsFromEnv(env.fn());
    ASSERT_FALSE(o.ok()) << name;
    EXPECT_EQ(o.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(o.status().message().find(std::string(name) + " is not set"), std::string::npos);
    EXPECT_NE(o.status().message().find("required: DMLC_ROLE"), std::string::npos);
  }
}

TEST(OptionsTest, MalformedValuesNameVariableAndValue) {
  struct Case {
    const char* name;
    const char* value;
    const char* expect;
  };
  for (const Case& c : {Case{"DMLC_ROLE", "boss", "scheduler, server or worker"},
                        Case{"DMLC_PS_ROOT_PORT", "90a", "'90a'"},
                        Case{"DMLC_PS_ROOT_PORT", "70000", "out of range"},
                        Case{"DMLC_NUM_WORKER", "0", "out of range"},
                        Case{"DMLC_NUM_SERVER", "-1", "out of range"},
                        Case{"PS_VERBOSE", "3", "PS_VERBOSE"},
                        Case{"DMLC_ENABLE_RDMA", "perhaps", "boolean"},
                        Case{"MESHPOST_TRANSPORT", "carrier-pigeon", "transport"}}) {
    FakeEnv env;
    env.vars[c.name] = c.value;
    auto o = OptionsFromEnv(env.fn());
    ASSERT_FALSE(o.ok()) << c.name << "=" << c.value;
    EXPECT_NE(o.status().message().find(c.expect), std::string::npos) << o.status();
  }
}

TEST(OptionsTest, RankMustFitTheRole) {
  FakeEnv env;
  env.vars["DMLC_NODE_RANK"] = "4";  // 4 workers: ranks 0..3
  auto o = OptionsFromEnv(env.fn());
  ASSERT_FALSE(o.ok());
  EXPECT_NE(o.status().message().find("DMLC_NUM_WORKER"), std::string::npos) << o.status();

  FakeEnv env2;
  env2.vars["STEPMESH_GPU"] = "2";  // group size 1: instance must be 0
  o = OptionsFromEnv(env2.fn());
  ASSERT_FALSE(o.ok());
  EXPECT_NE(o.status().message().find("DMLC_GROUP_SIZE"), std::string::npos) << o.status();
}

TEST(OptionsTest, OnlyTheSchedulerMayUsePortZero) {
  FakeEnv env;
  env.vars["DMLC_PS_ROOT_PORT"] = "0";
  EXPECT_FALSE(OptionsFromEnv(env.fn()).ok());
  env.vars["DMLC_ROLE"] = "scheduler";
  EXPECT_TRUE(OptionsFromEnv(env.fn()).ok());
}

TEST(OptionsTest, HeartbeatTimeoutMustExceedInterval) {
  Options o;
  o.root_port = 1;
  o.heartbeat_interval_ms = 1000;
  o.heartbeat_timeout_ms = 1500;
  EXPECT_FALSE(o.Validate().ok());
  o.heartbeat_timeout_ms = 2000;
  EXPECT_TRUE(o.Validate().ok());
}

}  // namespace
}  // namespace meshpost
