#include "tandem/api/errc.h"

#include <string>

namespace tandem::api {
namespace {

class Category final : public std::error_category {
 public:
  const char* name() const noexcept override { return "tandem.api"; }
  std::string message(int c) const override {
    switch (static_cast<errc>(c)) {
      case errc::ok:
        return "ok";
      case errc::bad_request:
        return "bad request";
      case errc::not_found:
        return "not found";
      case errc::unauthorized:
        return "unauthorized";
      case errc::body_too_large:
        return "body too large";
    }
    return "unknown api error " + std::to_string(c);
  }
};

}  // namespace

const std::error_category& api_category() noexcept {
  static const Category c;
  return c;
}

}  // namespace tandem::api
