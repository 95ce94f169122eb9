# Installation layout and the Debian package (CPack).
#
#   cmake --install build/release               # into /usr (the default prefix here)
#   cd build/release && cpack -G DEB            # tandem_<version>_amd64.deb
#
# The unit runs /usr/sbin/tandemd, so the prefix defaults to /usr rather than /usr/local.
include(GNUInstallDirs)

install(FILES ${PROJECT_SOURCE_DIR}/systemd/tandemd.service DESTINATION lib/systemd/system)
install(FILES ${PROJECT_SOURCE_DIR}/packaging/man/tandemd.8 ${PROJECT_SOURCE_DIR}/packaging/man/tandemctl.8
        DESTINATION ${CMAKE_INSTALL_MANDIR}/man8)
install(FILES ${PROJECT_SOURCE_DIR}/packaging/man/tandemd.toml.5 DESTINATION ${CMAKE_INSTALL_MANDIR}/man5)
install(FILES ${PROJECT_SOURCE_DIR}/packaging/tandemd.toml.example
        DESTINATION ${CMAKE_INSTALL_DOCDIR}/examples RENAME tandemd.toml)
install(FILES ${PROJECT_SOURCE_DIR}/README.md ${PROJECT_SOURCE_DIR}/docs/operations.md
              ${PROJECT_SOURCE_DIR}/docs/configuration.md ${PROJECT_SOURCE_DIR}/docs/api.md
              ${PROJECT_SOURCE_DIR}/docs/nbd.md ${PROJECT_SOURCE_DIR}/docs/metadata-format.md
              ${PROJECT_SOURCE_DIR}/docs/wire-protocol.md
        DESTINATION ${CMAKE_INSTALL_DOCDIR})

set(CPACK_PACKAGE_NAME tandem)
set(CPACK_PACKAGE_VENDOR "tandem")
set(CPACK_PACKAGE_CONTACT "tandem maintainers <tandem@localhost>")
set(CPACK_PACKAGE_DESCRIPTION_SUMMARY "block-device replication for disaster recovery")
set(CPACK_PACKAGE_DESCRIPTION "tandemd replicates Linux block devices between two hosts over mutual TLS, \
in crash-consistent cycles, with planned and unplanned failover, reprotect and failover tests \
driven by a REST API and tandemctl.")
# Debug information stays in the build tree; the package carries stripped binaries.
set(CPACK_STRIP_FILES ON)
set(CPACK_PACKAGING_INSTALL_PREFIX /usr)
set(CPACK_GENERATOR DEB)
set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT)
set(CPACK_DEBIAN_PACKAGE_SECTION admin)
set(CPACK_DEBIAN_PACKAGE_PRIORITY optional)
# Shared-library dependencies come from dpkg-shlibdeps (liburing2, libssl3, libsystemd0, ...);
# procps gives /bin/kill for ExecReload.
set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS ON)
set(CPACK_DEBIAN_PACKAGE_DEPENDS "procps")
set(CPACK_DEBIAN_PACKAGE_RECOMMENDS "nbd-client")
set(CPACK_DEBIAN_PACKAGE_SUGGESTS "libnbd-bin, curl")
set(CPACK_DEBIAN_PACKAGE_CONTROL_EXTRA
    ${PROJECT_SOURCE_DIR}/packaging/debian/postinst
    ${PROJECT_SOURCE_DIR}/packaging/debian/prerm
    ${PROJECT_SOURCE_DIR}/packaging/debian/postrm)
set(CPACK_DEBIAN_PACKAGE_CONTROL_STRICT_PERMISSION ON)
include(CPack)
