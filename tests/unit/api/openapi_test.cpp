// Plan: the OpenAPI document the daemon serves is the router's truth. Its paths and methods are
// exactly Router's routes(), every action it lists is one parse_action() knows (and nothing
// else is), and each action's request body schema names exactly the fields the parser accepts.
// The api integration test then calls every documented route on a real daemon.
#include <gtest/gtest.h>

#include <algorithm>
#include <nlohmann/json.hpp>
#include <set>
#include <variant>

#include "tandem/api/router.h"

namespace tandem::api {
namespace {

using json = nlohmann::json;

json document() {
  json d = json::parse(openapi_document(), nullptr, false);
  EXPECT_FALSE(d.is_discarded()) << "openapi.json is not valid JSON";
  return d;
}

TEST(OpenApi, PathsAreExactlyTheRoutes) {
  const json d = document();
  EXPECT_EQ(d.value("openapi", ""), "3.0.3");
  std::vector<std::string> documented;
  for (const auto& [path, item] : d["paths"].items()) {
    for (const auto& [method, op] : item.items()) {
      std::string m = method;
      std::transform(m.begin(), m.end(), m.begin(), [](unsigned char c) { return static_cast<char>(std::toupper(c)); });
      documented.push_back(m + " " + path);
    }
  }
  std::sort(documented.begin(), documented.end());
  EXPECT_EQ(documented, routes());
}

TEST(OpenApi, ActionsAndTheirBodiesMatchTheParser) {
  const json d = document();
  const std::string prefix = "/api/rest/replication_session/{id}/";
  std::set<std::string> verbs;
  for (const auto& [path, item] : d["paths"].items()) {
    if (path.rfind(prefix, 0) != 0) continue;
    const std::string verb = path.substr(prefix.size());
    verbs.insert(verb);
    // The parser accepts each documented body field as a boolean and refuses any other field.
    json schema = item["post"]["requestBody"]["content"]["application/json"]["schema"];
    if (schema.contains("$ref")) {
      const std::string ref = schema["$ref"];
      schema = d["components"]["schemas"][ref.substr(ref.rfind('/') + 1)];
    }
    EXPECT_EQ(schema.value("additionalProperties", true), false) << verb;
    json body = json::object();
    const json props = schema.value("properties", json::object());
    for (const auto& [field, fs] : props.items()) {
      EXPECT_EQ(fs.value("type", ""), "boolean") << verb << "." << field;
      body[field] = fs.value("default", false);
    }
    auto ok = parse_action(verb, "application/json", body.dump());
    EXPECT_TRUE(std::holds_alternative<ActionRequest>(ok)) << verb << " " << body.dump();
    auto extra = parse_action(verb, "application/json", R"({"undocumented": true})");
    ASSERT_TRUE(std::holds_alternative<HttpResponse>(extra)) << verb;
    EXPECT_EQ(std::get<HttpResponse>(extra).status, 400u) << verb;
  }
  const auto known = action_verbs();
  EXPECT_EQ(verbs, std::set<std::string>(known.begin(), known.end()));
  auto unknown = parse_action("explode", "", "");
  ASSERT_TRUE(std::holds_alternative<HttpResponse>(unknown));
  EXPECT_EQ(std::get<HttpResponse>(unknown).status, 404u);
}

}  // namespace
}  // namespace tandem::api
