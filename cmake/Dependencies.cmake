# Third-party dependencies, all from Debian 12 packages (see scripts/install-deps.sh).
find_package(PkgConfig REQUIRED)
find_package(Threads REQUIRED)

# Boost 1.81 (libboost1.81-dev): header-only Asio/Beast. The default 1.74 lacks as_tuple and
# awaitable operators, so insist on the exact version.
find_package(Boost 1.81.0 EXACT REQUIRED CONFIG)
find_package(OpenSSL REQUIRED)
find_package(spdlog REQUIRED)
find_package(fmt REQUIRED)
pkg_check_modules(URING REQUIRED IMPORTED_TARGET liburing)
pkg_check_modules(XXHASH REQUIRED IMPORTED_TARGET libxxhash)
pkg_check_modules(TOMLPP REQUIRED IMPORTED_TARGET tomlplusplus)
pkg_check_modules(SYSTEMD REQUIRED IMPORTED_TARGET libsystemd)
# libnbd (libnbd-dev): the NBD client an import reads its foreign source with.
pkg_check_modules(LIBNBD REQUIRED IMPORTED_TARGET libnbd)
find_package(GTest REQUIRED)

add_library(tandem_asio INTERFACE)
target_link_libraries(tandem_asio INTERFACE Boost::headers Threads::Threads)
target_compile_definitions(tandem_asio INTERFACE
  BOOST_ASIO_NO_DEPRECATED
  BOOST_ASIO_DISABLE_BOOST_COROUTINE)
