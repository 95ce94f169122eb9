// Plan: the OpenAPI document the daemon serves is the router's truth. Its paths and methods are
// exactly Router's routes(), every action it lists is one parse_action() knows (and nothing
// else is), and each action's request body schema names exactly the fields the parser accepts.
// The session and volume objects' fields in the document are exactly those docs/api.md documents
// (the session object's field table and its JSON example, the volume row of the Resources
// table). The api integration test then calls every documented route on a real daemon and holds
// the objects it returns to both documents.
#include <gtest/gtest.h>

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <variant>
#include <vector>

#include "tandem/api/router.h"

namespace tandem::api {
namespace {

using json = nlohmann::json;

json document() {
  json d = json::parse(openapi_document(), nullptr, false);
  EXPECT_FALSE(d.is_discarded()) << "openapi.json is not valid JSON";
  return d;
}

std::set<std::string> schema_fields(const json& d, const std::string& schema) {
  std::set<std::string> out;
  for (const auto& [name, _] : d["components"]["schemas"][schema]["properties"].items()) out.insert(name);
  return out;
}

// "missing: a b; extra: c": what `documented` lacks of `actual`, and what it has beyond it.
std::string difference(const std::set<std::string>& actual, const std::set<std::string>& documented) {
  std::string missing;
  std::string extra;
  for (const auto& f : actual) {
    if (!documented.contains(f)) missing += " " + f;
  }
  for (const auto& f : documented) {
    if (!actual.contains(f)) extra += " " + f;
  }
  return missing.empty() && extra.empty() ? std::string() : "missing:" + missing + "; extra:" + extra;
}

// The lines of docs/api.md's "## title" section, up to the next "## " heading.
std::vector<std::string> api_md_section(const std::string& title) {
  std::ifstream in(TANDEM_API_MD);
  EXPECT_TRUE(in.good()) << "cannot read " << TANDEM_API_MD;
  std::vector<std::string> out;
  bool inside = false;
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("## ", 0) == 0) {
      if (inside) break;
      inside = line == "## " + title;
      continue;
    }
    if (inside) out.push_back(line);
  }
  EXPECT_FALSE(out.empty()) << "docs/api.md has no section '## " << title << "'";
  return out;
}

// The backquoted names that start a line as a table's first column: "| `name` |".
std::vector<std::string> table_fields(const std::vector<std::string>& lines) {
  static const std::regex row(R"(^\| `([A-Za-z0-9_]+)` \|)");
  std::vector<std::string> out;
  for (const auto& line : lines) {
    std::smatch m;
    if (std::regex_search(line, m, row)) out.push_back(m[1]);
  }
  return out;
}

TEST(OpenApi, SessionFieldsAreThoseOfApiMd) {
  const json d = document();
  const std::set<std::string> schema = schema_fields(d, "ReplicationSession");
  ASSERT_FALSE(schema.empty());
  const auto section = api_md_section("The session object");
  const std::vector<std::string> rows = table_fields(section);
  const std::set<std::string> table(rows.begin(), rows.end());
  EXPECT_EQ(rows.size(), table.size()) << "a field is listed twice in the session object's table";
  EXPECT_EQ(difference(schema, table), "") << "docs/api.md's session object table vs openapi.json";
  // The JSON example: from the line "```json" to the next "```".
  std::string example;
  bool in_example = false;
  for (const auto& line : section) {
    if (in_example && line.rfind("```", 0) == 0) break;
    if (in_example) example += line + "\n";
    if (line == "```json") in_example = true;
  }
  const json ex = json::parse(example, nullptr, false);
  ASSERT_TRUE(ex.is_object()) << "docs/api.md: the session object's example is not a JSON object";
  std::set<std::string> keys;
  for (const auto& [k, _] : ex.items()) keys.insert(k);
  EXPECT_EQ(difference(schema, keys), "") << "docs/api.md's session object example vs openapi.json";
}

TEST(OpenApi, VolumeFieldsAreThoseOfApiMd) {
  const json d = document();
  const std::set<std::string> schema = schema_fields(d, "Volume");
  ASSERT_FALSE(schema.empty());
  // The notes of the Resources row "| `GET /api/rest/volume`...": its backquoted names, values in
  // parentheses left out.
  std::string notes;
  for (const auto& line : api_md_section("Resources")) {
    if (line.rfind("| `GET /api/rest/volume`", 0) != 0) continue;
    std::vector<std::string> cells;  // "| a | b | c |" -> "", " a ", " b ", " c ", ""
    std::stringstream split(line);
    for (std::string cell; std::getline(split, cell, '|');) cells.push_back(cell);
    ASSERT_GE(cells.size(), 4u) << line;
    notes = std::regex_replace(cells[3], std::regex(R"(\([^)]*\))"), "");
  }
  ASSERT_FALSE(notes.empty()) << "docs/api.md: no Resources row for GET /api/rest/volume";
  std::set<std::string> documented;
  static const std::regex name(R"(`([A-Za-z0-9_]+)`)");
  for (std::sregex_iterator it(notes.begin(), notes.end(), name), end; it != end; ++it) documented.insert((*it)[1]);
  EXPECT_EQ(difference(schema, documented), "") << "docs/api.md's volume fields vs openapi.json";
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
