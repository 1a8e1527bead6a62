# meshpost_feature_option(<var> <doc> <mode_out>): the AUTO|ON|OFF switch of an optional
# component (MESHPOST_WITH_CUDA, MESHPOST_WITH_RDMA). Declares the cache variable <var>
# (default AUTO; <doc> is its help text) and sets <mode_out> in the caller's scope to its
# value upper-cased. Any other value stops the configure step naming the variable, the value
# and the accepted ones. What AUTO and ON look for is the caller's business:
#   AUTO builds the component when its dependencies are found,
#   ON   fails the configure step when they are missing,
#   OFF  never builds it.
include_guard(GLOBAL)

function(meshpost_feature_option var doc mode_out)
  set(${var} "AUTO" CACHE STRING "${doc} (AUTO|ON|OFF)")
  set_property(CACHE ${var} PROPERTY STRINGS AUTO ON OFF)
  string(TOUPPER "${${var}}" mode)
  if(NOT mode MATCHES "^(AUTO|ON|OFF)$")
    message(FATAL_ERROR "${var}='${${var}}': expected AUTO, ON or OFF")
  endif()
  set(${mode_out} "${mode}" PARENT_SCOPE)
endfunction()
