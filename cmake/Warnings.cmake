# Warning flags for every tandem target. -Werror is switched on by TANDEM_WERROR (CI).
add_library(tandem_warnings INTERFACE)
target_compile_options(tandem_warnings INTERFACE
  -Wall -Wextra -Wshadow -Wconversion -Wsign-conversion -Wnon-virtual-dtor
  -Wold-style-cast -Wcast-align -Woverloaded-virtual -Wnull-dereference
  -Wimplicit-fallthrough -Wformat=2)
if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
  # GCC 12 reports false positives inside Asio/Beast coroutine frames with these.
  target_compile_options(tandem_warnings INTERFACE -Wno-maybe-uninitialized -Wno-dangling-reference
    -Wno-mismatched-new-delete)
endif()
if(TANDEM_WERROR)
  target_compile_options(tandem_warnings INTERFACE -Werror)
endif()

# Convenience: tandem_module(<name> SOURCES ... DEPS ...) creates tandem_<name> with its public
# headers under <name>/include.
function(tandem_module name)
  cmake_parse_arguments(M "" "" "SOURCES;DEPS;PRIVATE_DEPS" ${ARGN})
  add_library(tandem_${name} STATIC ${M_SOURCES})
  target_include_directories(tandem_${name} PUBLIC ${CMAKE_CURRENT_SOURCE_DIR}/include
                                             PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/src)
  target_link_libraries(tandem_${name} PUBLIC ${M_DEPS} PRIVATE tandem_warnings ${M_PRIVATE_DEPS})
endfunction()
