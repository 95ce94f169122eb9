// TLS configuration of the peer link: one OpenSSL context per daemon, shared by every
// connection of every Link.
//
// The context speaks TLS 1.3 only (both as client and as server), presents `cert` (with `key`)
// and requires the peer to present a certificate that chains to `ca`; there is no plaintext
// mode and no session resumption (every connection verifies the peer's certificate afresh).
// The peer's *name* is not checked here: each Link checks it against its configured peer name
// after the handshake (SAN DNS names, or the subject CN when there are none).
//
// Threading: make_tls_context may run on any thread; the context is read-only afterwards.
#pragma once

#include <memory>
#include <string>

#include "tandem/common/result.h"

namespace boost::asio::ssl {
class context;
}  // namespace boost::asio::ssl

namespace tandem::transport {

struct TlsFiles {
  std::string ca;    // PEM: the CA certificate(s) a peer's certificate must chain to
  std::string cert;  // PEM: our certificate, optionally followed by intermediates
  std::string key;   // PEM: our private key (should be mode 0600; a warning otherwise)
};

// Errors (errc::tls_config) name the file and what is wrong with it: unreadable (with errno),
// not PEM, no certificate in it, or a key that does not match the certificate. A certificate
// that does not verify against the CA (expired, other CA) only gets a warning: the peer will
// refuse it and say why, and tests need such contexts.
Result<std::shared_ptr<boost::asio::ssl::context>> make_tls_context(const TlsFiles& files);

}  // namespace tandem::transport
