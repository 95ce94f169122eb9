// Plan: parse_endpoint accepts "host:port" with a name or an IPv4 address and "[v6]:port",
// takes port 0 only for a listener, and rejects everything else with a reason that says what
// is wrong (no host, no port, a port that is not a number or is out of range, an IPv6 address
// without brackets). Endpoint::to_string writes the forms parse_endpoint reads.
#include <gtest/gtest.h>

#include <string>
#include <string_view>

#include "tandem/common/endpoint.h"

namespace tandem {
namespace {

Endpoint ok(std::string_view text, EndpointUse use = EndpointUse::dial) {
  auto r = parse_endpoint(text, use);
  EXPECT_TRUE(r.ok()) << text << ": " << (r.ok() ? "" : r.error().context);
  return r.ok() ? *r : Endpoint{};
}

// The reason parse_endpoint gives for refusing `text` ("" when it accepts it).
std::string why(std::string_view text, EndpointUse use = EndpointUse::dial) {
  auto r = parse_endpoint(text, use);
  if (r.ok()) return "";
  EXPECT_EQ(r.code(), std::make_error_code(std::errc::invalid_argument)) << text;
  return r.error().context;
}

bool has(const std::string& s, std::string_view part) { return s.find(part) != std::string::npos; }

TEST(ParseEndpoint, AcceptsIpv4NamesAndBracketedIpv6) {
  EXPECT_EQ(ok("127.0.0.1:10809"), (Endpoint{"127.0.0.1", 10809}));
  EXPECT_EQ(ok("0.0.0.0:7788"), (Endpoint{"0.0.0.0", 7788}));
  EXPECT_EQ(ok("localhost:8443"), (Endpoint{"localhost", 8443}));
  EXPECT_EQ(ok("site-b.example.com:1"), (Endpoint{"site-b.example.com", 1}));
  EXPECT_EQ(ok("h:65535"), (Endpoint{"h", 65535}));
  EXPECT_EQ(ok("[::1]:10809"), (Endpoint{"::1", 10809}));
  EXPECT_EQ(ok("[::]:80"), (Endpoint{"::", 80}));
  EXPECT_EQ(ok("[fe80::1%eth0]:7788"), (Endpoint{"fe80::1%eth0", 7788}));
  EXPECT_EQ(ok("[2001:db8::7]:443"), (Endpoint{"2001:db8::7", 443}));
  EXPECT_EQ(ok("h:080"), (Endpoint{"h", 80}));  // leading zeros
}

TEST(ParseEndpoint, PortZeroOnlyForListeners) {
  EXPECT_EQ(ok("127.0.0.1:0", EndpointUse::listen), (Endpoint{"127.0.0.1", 0}));
  EXPECT_EQ(ok("[::1]:0", EndpointUse::listen), (Endpoint{"::1", 0}));
  EXPECT_TRUE(has(why("127.0.0.1:0", EndpointUse::dial), "port 0 cannot be dialed"));
  EXPECT_TRUE(has(why("h:00000", EndpointUse::dial), "port 0"));
  // Everything else is the same for both uses.
  for (auto use : {EndpointUse::dial, EndpointUse::listen}) {
    EXPECT_EQ(ok("h:1", use), (Endpoint{"h", 1}));
    EXPECT_NE(why("h:65536", use), "");
    EXPECT_NE(why("localhost", use), "");
  }
}

TEST(ParseEndpoint, RejectsEmptyAndMissingParts) {
  EXPECT_EQ(why(""), "it is empty");
  EXPECT_EQ(why("localhost"), "no port");
  EXPECT_EQ(why("no-port-here"), "no port");
  EXPECT_EQ(why("h:"), "no port after the ':'");
  EXPECT_EQ(why(":80"), "no host before the ':'");
  EXPECT_EQ(why(":80", EndpointUse::listen), "no host before the ':'");
  EXPECT_EQ(why(":"), "no host before the ':'");
  EXPECT_EQ(why("[]:80"), "no address between the brackets");
  EXPECT_EQ(why("[::1]"), "no port after ']'");
  EXPECT_EQ(why("[::1]:"), "no port after the ':'");
}

TEST(ParseEndpoint, RejectsBadPorts) {
  EXPECT_EQ(why("h:http"), "port \"http\" is not a number");
  EXPECT_EQ(why("h:-1"), "port \"-1\" is not a number");
  EXPECT_EQ(why("h:+80"), "port \"+80\" is not a number");
  EXPECT_EQ(why("h: 80"), "port \" 80\" is not a number");
  EXPECT_EQ(why("h:80 "), "port \"80 \" is not a number");
  EXPECT_EQ(why("h:8o"), "port \"8o\" is not a number");
  EXPECT_EQ(why("h:70000"), "port 70000 is above 65535");
  EXPECT_EQ(why("h:65536"), "port 65536 is above 65535");
  EXPECT_EQ(why("h:99999999999999999999999"), "port 99999999999999999999999 is above 65535");
  EXPECT_EQ(why("[::1]:65536"), "port 65536 is above 65535");
}

TEST(ParseEndpoint, RejectsIpv6WithoutBrackets) {
  for (std::string_view text : {"::1:80", "::1", "fe80::1", "2001:db8::7:443", "a:b:80"}) {
    const std::string w = why(text);
    EXPECT_TRUE(has(w, "brackets")) << text << ": " << w;
    EXPECT_TRUE(has(w, "[::1]:port")) << text << ": " << w;
  }
}

TEST(ParseEndpoint, RejectsBadBrackets) {
  EXPECT_EQ(why("[::1:80"), "'[' without a closing ']'");
  EXPECT_EQ(why("["), "'[' without a closing ']'");
  EXPECT_EQ(why("[::1]80"), "expected ':' and the port after ']'");
  EXPECT_EQ(why("[::1]]:80"), "expected ':' and the port after ']'");
  EXPECT_EQ(why("[::1]x:80"), "expected ':' and the port after ']'");
  EXPECT_TRUE(has(why("a]:80"), "bracket inside the host"));
  EXPECT_TRUE(has(why("a[b:80"), "bracket inside the host"));
  EXPECT_TRUE(has(why("[a[b]:80"), "bracket inside the host"));
}

TEST(Endpoint, ToStringBracketsIpv6AndRoundTrips) {
  EXPECT_EQ((Endpoint{"127.0.0.1", 10809}).to_string(), "127.0.0.1:10809");
  EXPECT_EQ((Endpoint{"localhost", 0}).to_string(), "localhost:0");
  EXPECT_EQ((Endpoint{"::1", 7788}).to_string(), "[::1]:7788");
  for (std::string_view text : {"127.0.0.1:10809", "h:1", "[::1]:7788", "[fe80::1%eth0]:65535", "x.example:0"}) {
    const Endpoint e = ok(text, EndpointUse::listen);
    EXPECT_EQ(e.to_string(), text);
    EXPECT_EQ(ok(e.to_string(), EndpointUse::listen), e);
  }
}

}  // namespace
}  // namespace tandem
