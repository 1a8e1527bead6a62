// The transport table: one list, tcp last, creation by name with statuses that say why.
#include "van/registry.h"

#include <gtest/gtest.h>

#include <set>

namespace meshpost {
namespace {

TEST(RegistryTest, TcpIsLastAndAlwaysCompiled) {
  const auto names = CompiledTransports();
  ASSERT_FALSE(names.empty());
  EXPECT_EQ(names.back(), "tcp");
  EXPECT_EQ(KnownTransports().back().name, std::string("tcp"));
  EXPECT_TRUE(KnownTransports().back().compiled);
}

TEST(RegistryTest, CompiledIsTheCompiledSubsetOfKnownInOrder) {
  std::vector<std::string> expected;
  std::set<std::string> unique;
  for (const TransportInfo& t : KnownTransports()) {
    EXPECT_TRUE(unique.insert(t.name).second) << "duplicate " << t.name;
    EXPECT_TRUE(IsKnownTransport(t.name));
    if (t.compiled) expected.emplace_back(t.name);
  }
  EXPECT_EQ(CompiledTransports(), expected);
  EXPECT_FALSE(IsKnownTransport("shm"));
  EXPECT_EQ(KnownTransportNames(), "cma, rdma or tcp");
}

TEST(RegistryTest, UnknownNameIsInvalidArgument) {
  auto van = CreateVan("shm", VanOptions{});
  ASSERT_FALSE(van.ok());
  EXPECT_EQ(van.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(van.status().message().find("'shm'"), std::string::npos);
  EXPECT_NE(van.status().message().find("cma, rdma or tcp"), std::string::npos);
}

TEST(RegistryTest, EveryCompiledTransportIsCreatedByName) {
  for (const TransportInfo& t : KnownTransports()) {
    auto van = CreateVan(t.name, VanOptions{});
    if (!t.compiled) {
      ASSERT_FALSE(van.ok());
      EXPECT_EQ(van.status().code(), StatusCode::kUnimplemented) << van.status();
      continue;
    }
    // Creating never touches hardware (rdma opens its device at Bind).
    ASSERT_TRUE(van.ok()) << t.name << ": " << van.status();
    EXPECT_EQ(std::string((*van)->name()), t.name);
  }
}

}  // namespace
}  // namespace meshpost
