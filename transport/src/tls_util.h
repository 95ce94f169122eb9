// OpenSSL helpers private to the transport: the names a certificate answers to, the name
// check, and turning TLS failures into sentences an operator can act on.
#pragma once

#include <openssl/ssl.h>
#include <openssl/x509.h>

#include <boost/system/error_code.hpp>
#include <string>
#include <string_view>
#include <vector>

namespace tandem::transport::detail {

// The DNS subjectAltNames of `cert`, or its subject CN when it has no DNS SAN. Names are
// returned as they are (non-printable bytes shown as '?').
std::vector<std::string> certificate_names(X509* cert);
// Exact, ASCII-case-insensitive match of `expected` against one of `names` (no wildcards: a
// peer is one host).
bool name_matches(const std::vector<std::string>& names, std::string_view expected);
// "'site-c'" or "'a', 'b'".
std::string quote_names(const std::vector<std::string>& names);
// "certificate has expired (depth 0, subject /CN=site-b)" for the X509 verify failure
// OpenSSL reported on `ctx`.
std::string describe_verify_failure(X509_STORE_CTX* ctx);
// A TLS failure as a sentence: "peer does not offer TLS 1.3 (unsupported protocol)",
// "the peer refused our certificate (tlsv1 alert unknown ca)", or the error's own message.
std::string describe_tls_error(const boost::system::error_code& ec);
// True when `ec` is an OpenSSL error of the SSL library with the given reason code.
bool is_ssl_reason(const boost::system::error_code& ec, int reason);

}  // namespace tandem::transport::detail
