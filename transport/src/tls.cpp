// The TLS context (TLS 1.3 only, mutual authentication) and the OpenSSL helpers of tls_util.h.
#include "tandem/transport/tls.h"

#include <fmt/format.h>
#include <openssl/err.h>
#include <openssl/x509v3.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>

#include <boost/asio/ssl/context.hpp>
#include <boost/asio/ssl/error.hpp>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <iterator>

#include "tandem/common/assert.h"
#include "tandem/transport/errc.h"
#include "tandem/transport/frame.h"
#include "tls_util.h"

namespace tandem::transport {

namespace asio = boost::asio;

namespace {

// PEM files hold a certificate chain or a key: a few KiB. The bound keeps a misconfigured path
// (a disk image, /dev/zero) from being read into memory.
constexpr std::streamsize kPemFileBytesMax = 1 << 20;

Result<std::string> read_pem(const std::string& path, const char* what) {
  if (path.empty()) return Error(errc::tls_config, fmt::format("no {} file configured", what));
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return Error(errc::tls_config,
                 fmt::format("cannot read {} file '{}': {}", what, path, std::strerror(errno ? errno : ENOENT)));
  }
  std::string data;
  data.resize(static_cast<std::size_t>(kPemFileBytesMax) + 1);
  in.read(data.data(), kPemFileBytesMax + 1);
  if (in.bad()) {
    return Error(errc::tls_config,
                 fmt::format("cannot read {} file '{}': {}", what, path, std::strerror(errno ? errno : EIO)));
  }
  data.resize(static_cast<std::size_t>(in.gcount()));
  if (data.size() > static_cast<std::size_t>(kPemFileBytesMax)) {
    return Error(errc::tls_config,
                 fmt::format("{} file '{}' is larger than {} bytes; not a PEM file", what, path, kPemFileBytesMax));
  }
  if (data.find("-----BEGIN ") == std::string::npos) {
    return Error(errc::tls_config, fmt::format("{} file '{}' is not PEM (no -----BEGIN line)", what, path));
  }
  return data;
}

// Warns about what the peer is going to refuse, so an operator sees it at start-up rather than
// as a refused connection on the other host.
void check_own_certificate(SSL_CTX* ctx, const TlsFiles& files) {
  X509* cert = SSL_CTX_get0_certificate(ctx);
  if (cert == nullptr) return;
  STACK_OF(X509)* chain = nullptr;
  SSL_CTX_get0_chain_certs(ctx, &chain);
  X509_STORE_CTX* sctx = X509_STORE_CTX_new();
  if (sctx == nullptr) return;
  if (X509_STORE_CTX_init(sctx, SSL_CTX_get_cert_store(ctx), cert, chain) == 1 && X509_verify_cert(sctx) != 1) {
    spdlog::warn(
        "transport: our certificate '{}' does not verify against CA '{}': {}; the peer will "
        "refuse it",
        files.cert, files.ca, detail::describe_verify_failure(sctx));
  }
  X509_STORE_CTX_free(sctx);
  ERR_clear_error();
}

}  // namespace

Result<std::shared_ptr<asio::ssl::context>> make_tls_context(const TlsFiles& files) {
  auto ca = read_pem(files.ca, "CA");
  if (!ca) return ca.error();
  auto cert = read_pem(files.cert, "certificate");
  if (!cert) return cert.error();
  auto key = read_pem(files.key, "private key");
  if (!key) return key.error();
  // Anyone on the host who can read the key can impersonate this site to the peer: refuse a
  // world-readable key outright. A group-readable one (a deliberate key-access group) warns.
  struct stat st {};
  if (::stat(files.key.c_str(), &st) == 0 && (st.st_mode & S_IRWXO) != 0) {
    return Error(errc::tls_config,
                 fmt::format("private key '{}' is accessible to every user (mode {:04o}); refusing to use it: "
                             "chmod 600 it (or 640 with a dedicated group)",
                             files.key, st.st_mode & 07777));
  }
  if ((st.st_mode & S_IRWXG) != 0) {
    spdlog::warn("transport: private key '{}' is readable by its group (mode {:04o}); it should be 0600", files.key,
                 st.st_mode & 07777);
  }

  auto ctx = std::make_shared<asio::ssl::context>(asio::ssl::context::tls);
  SSL_CTX* native = ctx->native_handle();
  if (SSL_CTX_set_min_proto_version(native, TLS1_3_VERSION) != 1 ||
      SSL_CTX_set_max_proto_version(native, TLS1_3_VERSION) != 1) {
    return Error(errc::tls_config, "this OpenSSL cannot restrict the protocol to TLS 1.3");
  }
  // No resumption: tickets would let a reconnect skip the certificate check (and an expired or
  // revoked peer certificate must be refused on the next connection, not the next full one).
  SSL_CTX_set_num_tickets(native, 0);
  SSL_CTX_set_session_cache_mode(native, SSL_SESS_CACHE_OFF);
  SSL_CTX_set_options(native, SSL_OP_NO_TICKET | SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION);

  boost::system::error_code ec;
  ctx->add_certificate_authority(asio::buffer(*ca), ec);
  if (ec) return Error(errc::tls_config, fmt::format("CA file '{}': {}", files.ca, ec.message()));
  ctx->use_certificate_chain(asio::buffer(*cert), ec);
  if (ec) {
    return Error(errc::tls_config, fmt::format("certificate file '{}': {}", files.cert, ec.message()));
  }
  ctx->use_private_key(asio::buffer(*key), asio::ssl::context::pem, ec);
  const auto e = static_cast<unsigned long>(ec.value());
  if (ec && !(ec.category() == asio::error::get_ssl_category() && ERR_GET_LIB(e) == ERR_LIB_X509 &&
              ERR_GET_REASON(e) == X509_R_KEY_VALUES_MISMATCH)) {
    return Error(errc::tls_config, fmt::format("private key file '{}': {}", files.key, ec.message()));
  }
  if (ec || SSL_CTX_check_private_key(native) != 1) {
    ERR_clear_error();
    return Error(errc::tls_config,
                 fmt::format("private key '{}' does not match certificate '{}'", files.key, files.cert));
  }
  ctx->set_verify_mode(asio::ssl::verify_peer | asio::ssl::verify_fail_if_no_peer_cert, ec);
  if (ec) return Error(errc::tls_config, fmt::format("setting the verify mode: {}", ec.message()));
  check_own_certificate(native, files);
  return ctx;
}

namespace detail {
namespace {

std::string asn1_text(const ASN1_STRING* s) {
  const unsigned char* d = ASN1_STRING_get0_data(s);
  const int n = ASN1_STRING_length(s);
  if (d == nullptr || n <= 0) return {};
  return printable({reinterpret_cast<const std::byte*>(d), static_cast<std::size_t>(n)});
}

char ascii_lower(char c) { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c; }

}  // namespace

std::vector<std::string> certificate_names(X509* cert) {
  std::vector<std::string> names;
  if (cert == nullptr) return names;
  auto* sans = static_cast<GENERAL_NAMES*>(X509_get_ext_d2i(cert, NID_subject_alt_name, nullptr, nullptr));
  if (sans != nullptr) {
    const int n = sk_GENERAL_NAME_num(sans);
    for (int i = 0; i < n; ++i) {
      const GENERAL_NAME* g = sk_GENERAL_NAME_value(sans, i);
      if (g->type == GEN_DNS) names.push_back(asn1_text(g->d.dNSName));
    }
    GENERAL_NAMES_free(sans);
  }
  if (!names.empty()) return names;
  X509_NAME* subject = X509_get_subject_name(cert);
  for (int i = X509_NAME_get_index_by_NID(subject, NID_commonName, -1); i >= 0;
       i = X509_NAME_get_index_by_NID(subject, NID_commonName, i)) {
    names.push_back(asn1_text(X509_NAME_ENTRY_get_data(X509_NAME_get_entry(subject, i))));
  }
  return names;
}

bool name_matches(const std::vector<std::string>& names, std::string_view expected) {
  if (expected.empty()) return false;
  for (const auto& n : names) {
    if (n.size() != expected.size()) continue;
    bool same = true;
    for (std::size_t i = 0; i < n.size() && same; ++i) same = ascii_lower(n[i]) == ascii_lower(expected[i]);
    if (same) return true;
  }
  return false;
}

std::string quote_names(const std::vector<std::string>& names) {
  if (names.empty()) return "(none)";
  std::string s;
  for (const auto& n : names) {
    if (!s.empty()) s += ", ";
    s += "'" + n + "'";
  }
  return s;
}

std::string describe_verify_failure(X509_STORE_CTX* ctx) {
  const int err = X509_STORE_CTX_get_error(ctx);
  std::string s = X509_verify_cert_error_string(err);
  X509* cert = X509_STORE_CTX_get_current_cert(ctx);
  s += fmt::format(" (depth {}", X509_STORE_CTX_get_error_depth(ctx));
  if (cert != nullptr) {
    char subject[256] = {};
    X509_NAME_oneline(X509_get_subject_name(cert), subject, sizeof subject);
    s += fmt::format(", subject {}", subject);
  }
  return s + ")";
}

bool is_ssl_reason(const boost::system::error_code& ec, int reason) {
  if (ec.category() != asio::error::get_ssl_category()) return false;
  const auto e = static_cast<unsigned long>(ec.value());
  return ERR_GET_LIB(e) == ERR_LIB_SSL && ERR_GET_REASON(e) == reason;
}

std::string describe_tls_error(const boost::system::error_code& ec) {
  if (ec == asio::ssl::error::stream_truncated) return "the peer closed the connection";
  if (ec.category() == asio::error::get_ssl_category()) {
    const auto e = static_cast<unsigned long>(ec.value());
    const char* reason = ERR_reason_error_string(e);
    const std::string r = reason != nullptr ? reason : ec.message();
    if (ERR_GET_LIB(e) == ERR_LIB_SSL) {
      switch (ERR_GET_REASON(e)) {
        case SSL_R_UNSUPPORTED_PROTOCOL:
        case SSL_R_NO_PROTOCOLS_AVAILABLE:
        case SSL_R_TLSV1_ALERT_PROTOCOL_VERSION:
          return "the peer does not offer TLS 1.3 (" + r + ")";
        case SSL_R_WRONG_VERSION_NUMBER:
        case SSL_R_HTTP_REQUEST:
        case SSL_R_HTTPS_PROXY_REQUEST:
        case SSL_R_PACKET_LENGTH_TOO_LONG:
        case SSL_R_RECORD_LENGTH_MISMATCH:
          return "the peer does not speak TLS (" + r + ")";
        case SSL_R_PEER_DID_NOT_RETURN_A_CERTIFICATE:
          return "the peer presented no certificate";
        default:
          break;
      }
    }
    if (r.find("alert") != std::string::npos) return "TLS alert from the peer: " + r;
    return r;
  }
  if (ec == asio::error::eof) return "the peer closed the connection";
  return ec.message();
}

}  // namespace detail
}  // namespace tandem::transport
