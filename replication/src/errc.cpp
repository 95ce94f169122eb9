#include "tandem/replication/errc.h"

#include <string>

namespace tandem::replication {
namespace {

class Category final : public std::error_category {
 public:
  const char* name() const noexcept override { return "tandem.replication"; }
  std::string message(int c) const override {
    switch (static_cast<errc>(c)) {
      case errc::not_allowed_in_state:
        return "not allowed in state";
      case errc::wrong_role:
        return "wrong role";
      case errc::split_brain:
        return "split brain";
      case errc::unrelated_volumes:
        return "unrelated volumes";
      case errc::peer_unreachable:
        return "peer unreachable";
      case errc::bad_message:
        return "malformed replication message";
      case errc::paused:
        return "paused by an operator";
      case errc::mismatched_volumes:
        return "the volumes differ";
      case errc::destination_ahead:
        return "the destination holds newer data";
    }
    return "unknown replication error " + std::to_string(c);
  }
};

}  // namespace

const std::error_category& replication_category() noexcept {
  static const Category c;
  return c;
}

}  // namespace tandem::replication
