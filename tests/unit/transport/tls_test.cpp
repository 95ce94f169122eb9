// Plan: make_tls_context over the files make_certs.sh writes, plus broken copies made here.
// A good CA/cert/key loads; each broken input fails with errc::tls_config and a context that
// names the file and the problem (missing, not PEM, no certificate, key not matching the
// certificate); our own expired or foreign-CA certificate loads but logs a warning saying the
// peer will refuse it; a group-readable key loads with a warning, a world-readable one is refused. The context only
// allows TLS 1.3 and requires a peer certificate.
#include <gtest/gtest.h>
#include <openssl/ssl.h>
#include <sys/stat.h>

#include <boost/asio/ssl/context.hpp>
#include <filesystem>
#include <fstream>

#include "tandem/transport/errc.h"
#include "tandem/transport/tls.h"
#include "transport_test_util.h"

namespace tandem::transport::test {
namespace {

namespace fs = std::filesystem;

class TlsContextTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::path(certs_dir()) / ("broken-" + std::to_string(::getpid()));
    fs::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  std::string write(const std::string& name, const std::string& content,
                    fs::perms perms = fs::perms::owner_read | fs::perms::owner_write) {
    const fs::path p = dir_ / name;
    std::ofstream(p) << content;
    fs::permissions(p, perms);
    return p.string();
  }
  static std::string read(const std::string& path) {
    std::ifstream in(path);
    return {std::istreambuf_iterator<char>(in), {}};
  }
  fs::path dir_;
  LogCapture logs_;
};

TEST_F(TlsContextTest, GoodFilesMakeATls13OnlyMutualContext) {
  auto ctx = make_tls_context(tls_files("site-a"));
  ASSERT_TRUE(ctx.ok()) << ctx.error().message();
  SSL_CTX* c = (*ctx)->native_handle();
  EXPECT_EQ(SSL_CTX_get_min_proto_version(c), TLS1_3_VERSION);
  EXPECT_EQ(SSL_CTX_get_max_proto_version(c), TLS1_3_VERSION);
  EXPECT_EQ(SSL_CTX_get_verify_mode(c), SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT);
  EXPECT_FALSE(logs_.contains({"warn"}));
  EXPECT_FALSE(logs_.contains({"does not verify"}));
}

TEST_F(TlsContextTest, MissingFilesAreNamed) {
  TlsFiles f = tls_files("site-a");
  f.ca = (dir_ / "nope.crt").string();
  auto ctx = make_tls_context(f);
  ASSERT_FALSE(ctx.ok());
  EXPECT_EQ(ctx.code(), errc::tls_config);
  EXPECT_NE(ctx.error().context.find("cannot read CA file"), std::string::npos) << ctx.error().context;
  EXPECT_NE(ctx.error().context.find("No such file"), std::string::npos) << ctx.error().context;

  f = tls_files("site-a");
  f.key = "";
  ctx = make_tls_context(f);
  ASSERT_FALSE(ctx.ok());
  EXPECT_NE(ctx.error().context.find("no private key file configured"), std::string::npos);
}

TEST_F(TlsContextTest, NotPemAndWrongContentAreNamed) {
  TlsFiles f = tls_files("site-a");
  f.cert = write("junk.crt", "this is not a certificate\n");
  auto ctx = make_tls_context(f);
  ASSERT_FALSE(ctx.ok());
  EXPECT_EQ(ctx.code(), errc::tls_config);
  EXPECT_NE(ctx.error().context.find("not PEM"), std::string::npos) << ctx.error().context;

  f = tls_files("site-a");
  f.ca = write("key-as-ca.crt", read(tls_files("site-a").key));  // PEM, but no certificate
  ctx = make_tls_context(f);
  ASSERT_FALSE(ctx.ok());
  EXPECT_EQ(ctx.code(), errc::tls_config);
  EXPECT_NE(ctx.error().context.find("CA file"), std::string::npos) << ctx.error().context;
}

TEST_F(TlsContextTest, KeyNotMatchingTheCertificateIsAnError) {
  TlsFiles f = tls_files("site-a");
  f.key = tls_files("site-b").key;
  auto ctx = make_tls_context(f);
  ASSERT_FALSE(ctx.ok());
  EXPECT_EQ(ctx.code(), errc::tls_config);
  EXPECT_NE(ctx.error().context.find("does not match certificate"), std::string::npos) << ctx.error().context;
}

TEST_F(TlsContextTest, OwnCertificateThePeerWillRefuseIsAWarning) {
  ASSERT_TRUE(make_tls_context(tls_files("expired-site-b")).ok());
  EXPECT_TRUE(logs_.contains({"does not verify", "certificate has expired"})) << logs_.dump();
  TlsFiles f = tls_files("other-site-b");  // signed by other-ca, but we trust ca
  ASSERT_TRUE(make_tls_context(f).ok());
  EXPECT_TRUE(logs_.contains({"does not verify", "unable to get local issuer certificate"})) << logs_.dump();
}

TEST_F(TlsContextTest, GroupReadableKeyIsAWarning) {
  TlsFiles f = tls_files("site-a");
  f.key = write("open.key", read(f.key), fs::perms::owner_read | fs::perms::owner_write | fs::perms::group_read);
  ASSERT_TRUE(make_tls_context(f).ok());
  EXPECT_TRUE(logs_.contains({"readable by its group", "0640"})) << logs_.dump();
}

TEST_F(TlsContextTest, WorldReadableKeyIsRefused) {
  TlsFiles f = tls_files("site-a");
  f.key = write("world.key", read(f.key),
                fs::perms::owner_read | fs::perms::owner_write | fs::perms::group_read | fs::perms::others_read);
  auto ctx = make_tls_context(f);
  ASSERT_FALSE(ctx.ok());
  EXPECT_EQ(ctx.code(), errc::tls_config);
  EXPECT_NE(ctx.error().message().find("accessible to every user (mode 0644)"), std::string::npos)
      << ctx.error().message();
}

}  // namespace
}  // namespace tandem::transport::test
