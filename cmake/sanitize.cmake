# MESHPOST_SANITIZE: build every target with compiler sanitizers (docs/development.md).
#   ""                   off (default)
#   address              AddressSanitizer (+ LeakSanitizer)
#   undefined            UndefinedBehaviorSanitizer, non-recoverable: the first report aborts
#   address,undefined    both (what CI runs)
#   thread               ThreadSanitizer (cannot be combined with address)
#   thread,undefined     allowed as well
# Applied globally (compile and link flags of every target) because a sanitizer needs every
# translation unit that touches shared memory instrumented, and the runtime linked into the
# executables. Use a separate build directory per setting.
set(MESHPOST_SANITIZE "" CACHE STRING
    "Sanitizers to build with: address, undefined, address,undefined or thread (empty: none)")
set_property(CACHE MESHPOST_SANITIZE PROPERTY STRINGS "" address undefined "address,undefined" thread)

if(NOT MESHPOST_SANITIZE STREQUAL "")
  string(REPLACE "," ";" _mp_san_list "${MESHPOST_SANITIZE}")
  set(_mp_san_seen "")
  foreach(_mp_san IN LISTS _mp_san_list)
    string(STRIP "${_mp_san}" _mp_san)
    if(NOT _mp_san MATCHES "^(address|undefined|thread)$")
      message(FATAL_ERROR
        "MESHPOST_SANITIZE='${MESHPOST_SANITIZE}': unknown sanitizer '${_mp_san}'; expected a "
        "comma-separated list of address, undefined, thread (e.g. 'address,undefined'), or empty")
    endif()
    if(_mp_san IN_LIST _mp_san_seen)
      message(FATAL_ERROR "MESHPOST_SANITIZE='${MESHPOST_SANITIZE}': '${_mp_san}' is listed twice")
    endif()
    list(APPEND _mp_san_seen "${_mp_san}")
  endforeach()
  if("thread" IN_LIST _mp_san_seen AND "address" IN_LIST _mp_san_seen)
    message(FATAL_ERROR
      "MESHPOST_SANITIZE='${MESHPOST_SANITIZE}': thread and address cannot be combined "
      "(the runtimes conflict); use two build directories")
  endif()

  list(JOIN _mp_san_seen "," _mp_san_joined)
  # Frame pointers make the sanitizers' stack traces complete at -O1 and above.
  set(_mp_san_flags -fsanitize=${_mp_san_joined} -fno-omit-frame-pointer)
  if("undefined" IN_LIST _mp_san_seen)
    # Recoverable UBSan prints and continues, so a test would pass over undefined behaviour.
    list(APPEND _mp_san_flags -fno-sanitize-recover=all)
  endif()
  include(CheckCXXSourceCompiles)
  set(CMAKE_REQUIRED_FLAGS "-fsanitize=${_mp_san_joined}")
  set(CMAKE_REQUIRED_LINK_OPTIONS "-fsanitize=${_mp_san_joined}")
  check_cxx_source_compiles("int main() { return 0; }" MESHPOST_SANITIZE_WORKS_${_mp_san_joined})
  unset(CMAKE_REQUIRED_FLAGS)
  unset(CMAKE_REQUIRED_LINK_OPTIONS)
  if(NOT MESHPOST_SANITIZE_WORKS_${_mp_san_joined})
    message(FATAL_ERROR
      "MESHPOST_SANITIZE='${MESHPOST_SANITIZE}': ${CMAKE_CXX_COMPILER} cannot build and link "
      "with -fsanitize=${_mp_san_joined} (Debian: the libasan8/libubsan1/libtsan2 runtimes "
      "come with g++-12)")
  endif()
  message(STATUS "meshpost: sanitizers enabled: ${_mp_san_joined}")
  add_compile_options(${_mp_san_flags})
  add_link_options(-fsanitize=${_mp_san_joined})
endif()
