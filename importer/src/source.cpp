// open_source(): an NBD URI or a local path; the URI redaction every display of a source uses.
#include <boost/asio/use_awaitable.hpp>

#include "nbd_source.h"

namespace tandem::importer {

bool is_nbd_uri(const std::string& s) {
  for (const char* scheme : {"nbd://", "nbds://", "nbd+unix://", "nbds+unix://", "nbd+vsock://", "nbds+vsock://"}) {
    if (s.starts_with(scheme)) return true;
  }
  return false;
}

std::string redact_uri(const std::string& uri) {
  const auto scheme_end = uri.find("://");
  if (scheme_end == std::string::npos) return uri.substr(0, uri.find('?'));
  std::string rest = uri.substr(scheme_end + 3);
  rest = rest.substr(0, rest.find('?'));
  const auto slash = rest.find('/');
  const auto at = rest.find('@');
  if (at != std::string::npos && (slash == std::string::npos || at < slash)) rest = rest.substr(at + 1);
  return uri.substr(0, scheme_end + 3) + rest;
}

asio::awaitable<Result<std::unique_ptr<ForeignSource>>> open_source(asio::any_io_executor ex, engine::DeviceEnv& env,
                                                                    const std::string& uri_or_path,
                                                                    SourceOptions opts) {
  Result<std::unique_ptr<ForeignSource>> r = Error(std::make_error_code(std::errc::invalid_argument),
                                                   "a source is an nbd://, nbds://, nbd+unix:// or nbds+unix:// URI or "
                                                   "an absolute path to a file or block device");
  if (is_nbd_uri(uri_or_path)) {
    r = co_await open_nbd_source(ex, uri_or_path, opts);
  } else if (uri_or_path.starts_with("/")) {
    r = co_await open_file_source(env, uri_or_path);
  }
  if (!r) {
    // Every failure names the source (redacted), once.
    Error e = r.error();
    const std::string shown = redact_uri(uri_or_path);
    if (e.context.find(shown) == std::string::npos) e.context = e.context.empty() ? shown : shown + ": " + e.context;
    co_return e;
  }
  const std::uint64_t size = (*r)->size();
  if (size == 0 || size % engine::Volume::kBlockBytes != 0) {
    co_await (*r)->close();
    co_return Error(
        std::make_error_code(std::errc::invalid_argument),
        redact_uri(uri_or_path) + ": its size, " + std::to_string(size) + " bytes, is not a non-zero multiple of 4096");
  }
  co_return r;
}

}  // namespace tandem::importer
