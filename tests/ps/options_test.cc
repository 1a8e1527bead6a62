#include "ps/options.h"

#include <gtest/gtest.h>

#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <variant>

#ifdef MESHPOST_HAVE_RDMA
#include "van/rdma/rdma_van.h"
#endif

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
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& [name, value] : vars) out.push_back(name);
    return out;
  }
  Result<Options> Parse() { return OptionsFromEnv(fn(), names()); }
};

bool Contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

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
  for (const Case& c :
       {Case{"DMLC_ROLE", "boss", "scheduler, server or worker"},
        Case{"DMLC_PS_ROOT_PORT", "90a", "'90a'"},
        Case{"DMLC_PS_ROOT_PORT", "70000", "out of range"},
        Case{"DMLC_NUM_WORKER", "0", "out of range"}, Case{"DMLC_NUM_SERVER", "-1", "out of range"},
        Case{"PS_VERBOSE", "-1", "PS_VERBOSE"},
        Case{"DMLC_ENABLE_RDMA", "perhaps", "not a van type"},
        Case{"MESHPOST_LOG_LEVEL", "chatty", "trace, debug, info, warn"},
        Case{"STEPMESH_CPU_START_OFFSET", "ten", "STEPMESH_CPU_START_OFFSET"},
        Case{"STEPMESH_BIND_CPU_CORE", "maybe", "boolean"},
        Case{"DMLC_RANK_OFFSET", "x", "DMLC_RANK_OFFSET"},
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
  env2.vars["STEPMESH_GPU"] = "4";  // rank 0 * 1 + 4 + 0 = 4, not < 4 workers
  o = OptionsFromEnv(env2.fn());
  ASSERT_FALSE(o.ok());
  EXPECT_TRUE(Contains(o.status().message(), "STEPMESH_GPU")) << o.status();
  EXPECT_TRUE(Contains(o.status().message(), "DMLC_NUM_WORKER")) << o.status();
}

// StepMesh: rank = DMLC_NODE_RANK * DMLC_GROUP_SIZE + STEPMESH_GPU + DMLC_RANK_OFFSET;
// DMLC_INSTANCE_ID defaults to STEPMESH_GPU.
TEST(OptionsTest, RankArithmeticIsStepMeshs) {
  FakeEnv env;
  env.vars["DMLC_NUM_WORKER"] = "16";
  env.vars["DMLC_GROUP_SIZE"] = "8";
  env.vars["DMLC_NODE_RANK"] = "1";
  env.vars["STEPMESH_GPU"] = "3";
  auto o = env.Parse();
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->Rank(), 11);
  EXPECT_EQ(o->gpu, 3);
  EXPECT_EQ(o->instance, 3);

  env.vars["DMLC_INSTANCE_ID"] = "0";
  o = env.Parse();
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->instance, 0);
  EXPECT_EQ(o->Rank(), 11);  // the instance id does not enter the rank

  // sglang's one-cluster-per-GPU launch: STEPMESH_GPU=3, DMLC_RANK_OFFSET=-3 -> rank 0.
  FakeEnv one;
  one.vars["DMLC_NUM_WORKER"] = "1";
  one.vars["DMLC_NUM_SERVER"] = "1";
  one.vars["STEPMESH_GPU"] = "3";
  one.vars["DMLC_RANK_OFFSET"] = "-3";
  o = one.Parse();
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->Rank(), 0);
  EXPECT_EQ(o->gpu, 3);

  one.vars["DMLC_RANK_OFFSET"] = "-4";  // rank -1
  o = one.Parse();
  ASSERT_FALSE(o.ok());
  EXPECT_TRUE(Contains(o.status().message(), "DMLC_RANK_OFFSET")) << o.status();
}

TEST(OptionsTest, GroupSizeMixUpWithStepMeshCountingIsExplained) {
  // StepMesh's multi-GPU script: one node group of 8 workers is DMLC_NUM_WORKER=1.
  FakeEnv env;
  env.vars["DMLC_NUM_WORKER"] = "1";
  env.vars["DMLC_GROUP_SIZE"] = "8";
  env.vars["STEPMESH_GPU"] = "5";
  auto o = env.Parse();
  ASSERT_FALSE(o.ok());
  EXPECT_TRUE(Contains(o.status().message(), "set DMLC_NUM_WORKER=8")) << o.status();
}

TEST(OptionsTest, EnableRdmaTakesStepMeshsValues) {
  struct Case {
    const char* enable_rdma;  // nullptr: unset
    const char* van_type;     // DMLC_PS_VAN_TYPE, nullptr: unset
    bool want;
  };
  for (const Case& c :
       {Case{nullptr, nullptr, false}, Case{"zmq", nullptr, false}, Case{"0", nullptr, false},
        Case{"ibverbs", nullptr, true}, Case{"IBVERBS", nullptr, true}, Case{"1", nullptr, true},
        Case{"true", nullptr, true}, Case{"false", nullptr, false}, Case{nullptr, "ibverbs", true},
        Case{nullptr, "zmq", false}, Case{"zmq", "ibverbs", false}, Case{"ibverbs", "zmq", true}}) {
    FakeEnv env;
    if (c.enable_rdma) env.vars["DMLC_ENABLE_RDMA"] = c.enable_rdma;
    if (c.van_type) env.vars["DMLC_PS_VAN_TYPE"] = c.van_type;
    auto o = env.Parse();
    ASSERT_TRUE(o.ok()) << o.status();
    EXPECT_EQ(o->enable_rdma, c.want) << (c.enable_rdma ? c.enable_rdma : "unset") << " / "
                                      << (c.van_type ? c.van_type : "unset");
    // MESHPOST_TRANSPORT alone forces a transport for every pair.
    EXPECT_EQ(o->ForcedTransport(), "");
  }
}

TEST(OptionsTest, StepMeshVansMeshpostLacksAreRefusedWithTheSupportedList) {
  for (const char* van : {"fabric", "ucx", "tp", "multivan"}) {
    for (const char* var : {"DMLC_ENABLE_RDMA", "DMLC_PS_VAN_TYPE"}) {
      FakeEnv env;
      env.vars[var] = van;
      auto o = env.Parse();
      ASSERT_FALSE(o.ok()) << var << "=" << van;
      EXPECT_EQ(o.status().code(), StatusCode::kInvalidArgument);
      EXPECT_TRUE(Contains(o.status().message(), std::string(var) + "='" + van + "'"))
          << o.status();
      EXPECT_TRUE(Contains(o.status().message(), "supported: zmq or 0")) << o.status();
      EXPECT_TRUE(Contains(o.status().message(), "ibverbs or 1")) << o.status();
    }
  }
  FakeEnv ucx;
  ucx.vars["DMLC_ENABLE_UCX"] = "1";
  auto o = ucx.Parse();
  ASSERT_FALSE(o.ok());
  EXPECT_TRUE(Contains(o.status().message(), "DMLC_ENABLE_UCX=1")) << o.status();
  EXPECT_TRUE(Contains(o.status().message(), "supported: zmq or 0")) << o.status();
  ucx.vars["DMLC_ENABLE_UCX"] = "0";
  EXPECT_TRUE(ucx.Parse().ok());
}

TEST(OptionsTest, ForcedTransportComesOnlyFromMeshpostTransport) {
  FakeEnv env;
  env.vars["DMLC_ENABLE_RDMA"] = "ibverbs";
  env.vars["MESHPOST_TRANSPORT"] = "tcp";
  auto o = env.Parse();
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_TRUE(o->enable_rdma);
  EXPECT_EQ(o->ForcedTransport(), "tcp");
}

TEST(OptionsTest, InterfaceAutoAndCpuBinding) {
  FakeEnv env;
  env.vars["DMLC_INTERFACE"] = "AUTO";
  env.vars["STEPMESH_BIND_CPU_CORE"] = "1";
  env.vars["STEPMESH_CPU_START_OFFSET"] = "10";
  auto o = env.Parse();
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->interface, "auto");
  EXPECT_TRUE(o->bind_cpu_core);
  EXPECT_EQ(o->cpu_start_offset, 10);

  FakeEnv plain;
  o = plain.Parse();
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_FALSE(o->bind_cpu_core);  // meshpost's default; StepMesh's is 1
}

TEST(OptionsTest, LogLevelFromPsVerboseOrMeshpostLogLevel) {
  struct Case {
    const char* verbose;
    const char* level;
    LogLevel want;
  };
  for (const Case& c :
       {Case{nullptr, nullptr, LogLevel::kInfo}, Case{"0", nullptr, LogLevel::kInfo},
        Case{"1", nullptr, LogLevel::kDebug}, Case{"2", nullptr, LogLevel::kTrace},
        Case{"4", nullptr, LogLevel::kTrace}, Case{nullptr, "warn", LogLevel::kWarn},
        Case{nullptr, "WARNING", LogLevel::kWarn}, Case{nullptr, "error", LogLevel::kError},
        Case{"2", "error", LogLevel::kError}, Case{nullptr, "off", LogLevel::kOff}}) {
    FakeEnv env;
    if (c.verbose) env.vars["PS_VERBOSE"] = c.verbose;
    if (c.level) env.vars["MESHPOST_LOG_LEVEL"] = c.level;
    auto o = env.Parse();
    ASSERT_TRUE(o.ok()) << o.status();
    EXPECT_EQ(o->EffectiveLogLevel(), c.want)
        << (c.verbose ? c.verbose : "-") << " " << (c.level ? c.level : "-");
  }
}

TEST(OptionsTest, UnknownMeshpostVariableWarnsNamingTheClosest) {
  FakeEnv env;
  env.vars["MESHPOST_SPIN_USS"] = "3";
  env.vars["MESHPOST_TRANSPROT"] = "tcp";
  env.vars["MESHPOST_ITEST_SCENARIO"] = "x";  // a test tool's variable: no warning
  env.vars["SOMETHING_ELSE"] = "1";           // not ours: no warning
  auto o = env.Parse();
  ASSERT_TRUE(o.ok()) << o.status();
  ASSERT_EQ(o->warnings.size(), 2u);
  std::string all = o->warnings[0] + "\n" + o->warnings[1];
  EXPECT_TRUE(Contains(all, "MESHPOST_SPIN_USS ignored; did you mean MESHPOST_SPIN_US?")) << all;
  EXPECT_TRUE(Contains(all, "MESHPOST_TRANSPROT ignored; did you mean MESHPOST_TRANSPORT?")) << all;
  EXPECT_EQ(ClosestKnownVariable("MESHPOST_RDMA_DEVCE"), "MESHPOST_RDMA_DEVICE");
}

TEST(OptionsTest, IgnoredStepMeshVariablesAreAcceptedWithAReason) {
  FakeEnv env;
  env.vars["STEPMESH_SPLIT_QP_LAG"] = "1";
  env.vars["STEPMESH_DROP_RATE"] = "5";
  auto o = env.Parse();
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_TRUE(o->warnings.empty());
  ASSERT_EQ(o->ignored.size(), 2u);
  for (const std::string& line : o->ignored) {
    EXPECT_TRUE(Contains(line, "accepted and ignored: ")) << line;
  }
}

TEST(OptionsTest, RdmaVariablesTravelWithTheOptions) {
  FakeEnv env;
  env.vars["MESHPOST_RDMA_DEVICE"] = "mlx5_0";
  env.vars["MESHPOST_RDMA_GID_INDEX"] = "3";
  auto o = env.Parse();
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->rdma_env.at("MESHPOST_RDMA_DEVICE"), "mlx5_0");
  EXPECT_EQ(o->rdma_env.at("MESHPOST_RDMA_GID_INDEX"), "3");
}

// ---- the option table is the one list ----

// Records every variable a parser asks for.
struct Recorder {
  std::map<std::string, std::string> vars;
  std::set<std::string> asked;
  EnvLookup fn() {
    return [this](const char* name) -> const char* {
      asked.insert(name);
      auto it = vars.find(name);
      return it == vars.end() ? nullptr : it->second.c_str();
    };
  }
};

TEST(OptionTableTest, EveryVariableTheParsersReadIsInTheTableAndViceVersa) {
  Recorder r;
  r.vars = FakeEnv().vars;
  ASSERT_TRUE(OptionsFromEnv(r.fn(), {}).ok());
#ifdef MESHPOST_HAVE_RDMA
  ASSERT_TRUE(RdmaOptionsFromEnv(r.fn()).ok());
#endif
  std::set<std::string> in_table;
  for (const OptionSpec& o : OptionTable()) {
    EXPECT_TRUE(in_table.insert(o.variable).second) << "duplicate row " << o.variable;
    if (o.group == OptionGroup::kIgnored) {
      EXPECT_EQ(r.asked.count(o.variable), 0u) << o.variable << " is read but listed as ignored";
      continue;
    }
#ifndef MESHPOST_HAVE_RDMA
    if (o.group == OptionGroup::kRdma) continue;
#endif
    EXPECT_EQ(r.asked.count(o.variable), 1u) << o.variable << " is in the table but never read";
  }
  for (const std::string& name : r.asked) {
    EXPECT_EQ(in_table.count(name), 1u) << name << " is read but missing from OptionTable()";
  }
}

// OptionsFromEnv reads a row with a field by the row's range; where the docs' "valid values"
// column states a plain range ("1–4096", "≥ 100"), it must be that range.
TEST(OptionTableTest, RowRangesAgreeWithTheDocumentedValidValues) {
  const std::regex range("^(-?[0-9]+)–(-?[0-9]+)$");
  const std::regex at_least("^≥ ([0-9]+)$");
  int checked = 0;
  for (const OptionSpec& o : OptionTable()) {
    const bool integer = std::holds_alternative<int Options::*>(o.read.field) ||
                         std::holds_alternative<int64_t Options::*>(o.read.field);
    if (o.group == OptionGroup::kIgnored) {
      EXPECT_TRUE(std::holds_alternative<std::monostate>(o.read.field)) << o.variable;
    }
    if (!integer) continue;
    EXPECT_LE(o.read.min, o.read.max) << o.variable;
    std::smatch m;
    const std::string valid = o.valid;
    if (std::regex_match(valid, m, range)) {
      EXPECT_EQ(o.read.min, std::stoll(m[1])) << o.variable << ": " << valid;
      EXPECT_EQ(o.read.max, std::stoll(m[2])) << o.variable << ": " << valid;
      ++checked;
    } else if (std::regex_match(valid, m, at_least)) {
      EXPECT_EQ(o.read.min, std::stoll(m[1])) << o.variable << ": " << valid;
      ++checked;
    }
  }
  EXPECT_GE(checked, 12) << "the plain-range rows were not found";
}

TEST(OptionTableTest, ARowsRangeIsEnforcedWithTheVariableInTheMessage) {
  for (const OptionSpec& o : OptionTable()) {
    if (!std::holds_alternative<int Options::*>(o.read.field)) continue;
    FakeEnv env;
    env.vars["DMLC_ROLE"] = "scheduler";
    env.vars[o.variable] = std::to_string(o.read.max + 1);
    auto parsed = env.Parse();
    ASSERT_FALSE(parsed.ok()) << o.variable << "=" << o.read.max + 1 << " was accepted";
    EXPECT_TRUE(Contains(parsed.status().message(), o.variable)) << parsed.status();
  }
}

TEST(OptionTableTest, KeywordsAreUniqueAndNamedLikeTheirVariables) {
  std::set<std::string> keywords;
  for (const OptionSpec& o : OptionTable()) {
    if (*o.keyword == '\0') continue;
    EXPECT_TRUE(keywords.insert(o.keyword).second) << "duplicate keyword " << o.keyword;
    EXPECT_NE(o.group, OptionGroup::kIgnored) << o.variable;
  }
}

TEST(OptionTableTest, ConfigurationDocHoldsTheGeneratedTables) {
  std::ifstream in(std::string(MESHPOST_SOURCE_DIR) + "/docs/configuration.md");
  ASSERT_TRUE(in.good()) << "cannot read docs/configuration.md";
  std::stringstream doc;
  doc << in.rdbuf();
  for (OptionGroup g :
       {OptionGroup::kLaunch, OptionGroup::kMeshpost, OptionGroup::kRdma, OptionGroup::kIgnored}) {
    const std::string name = OptionGroupName(g);
    const std::string block = "<!-- options:" + name + " -->\n" + OptionTableMarkdown(g) +
                              "<!-- /options:" + name + " -->";
    EXPECT_TRUE(Contains(doc.str(), block))
        << "docs/configuration.md's '" << name << "' table differs from OptionTable(); "
        << "regenerate it: .venv/bin/python -m meshpost.options_doc --write-docs "
           "docs/configuration.md";
  }
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

// MESHPOST_SPIN_US unset is automatic (-1): the pre-Start default, then AutoSpinUs, which
// spins only where waiting threads receive themselves and every local worker and server
// has a core. A set value is used as is; below -1 is refused, naming the option.
TEST(OptionsTest, SpinIsAutomaticUnlessSet) {
  Options o;
  o.root_port = 1;
  EXPECT_EQ(o.spin_us, -1);
  EXPECT_EQ(o.EffectiveSpinUs(), DefaultSpinUs());
  EXPECT_TRUE(o.Validate().ok());
  EXPECT_EQ(AutoSpinUs(1, true), kAutoSpinUs);  // one node always has a core
  EXPECT_EQ(kAutoSpinUs, 300);
  EXPECT_EQ(AutoSpinUs(1 << 20, true), DefaultSpinUs());
  EXPECT_EQ(AutoSpinUs(1, false), DefaultSpinUs());
  FakeEnv env;
  env.vars["MESHPOST_SPIN_US"] = "0";
  auto set = OptionsFromEnv(env.fn());
  ASSERT_TRUE(set.ok()) << set.status().ToString();
  EXPECT_EQ(set->EffectiveSpinUs(), 0);
  o.spin_us = -2;
  Status bad = o.Validate();
  EXPECT_FALSE(bad.ok());
  EXPECT_NE(bad.message().find("MESHPOST_SPIN_US"), std::string::npos) << bad.ToString();
}

}  // namespace
}  // namespace meshpost
