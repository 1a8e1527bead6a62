# RDMA van (van/rdma/, libibverbs). MESHPOST_WITH_RDMA:
#   AUTO (default) builds it when infiniband/verbs.h and libibverbs are found,
#   ON fails the configure step when they are missing, OFF never builds it.
# Sets the CMake variable MESHPOST_HAVE_RDMA so the transport registry (van/registry.cc,
# which links meshpost_rdma) and tests/ know whether the target exists. No compile
# definition leaks to other targets: ps/ reaches the RDMA van by name through the registry.
include(${CMAKE_CURRENT_LIST_DIR}/feature_option.cmake)
meshpost_feature_option(MESHPOST_WITH_RDMA "Build the RDMA van over libibverbs" _mp_rdma_mode)

set(MESHPOST_HAVE_RDMA OFF)
if(NOT _mp_rdma_mode STREQUAL "OFF")
  find_path(MESHPOST_IBVERBS_INCLUDE_DIR infiniband/verbs.h)
  find_library(MESHPOST_IBVERBS_LIBRARY ibverbs)
  if(MESHPOST_IBVERBS_INCLUDE_DIR AND MESHPOST_IBVERBS_LIBRARY)
    set(MESHPOST_HAVE_RDMA ON)
  elseif(_mp_rdma_mode STREQUAL "ON")
    message(FATAL_ERROR
      "MESHPOST_WITH_RDMA=ON but libibverbs was not found "
      "(infiniband/verbs.h: '${MESHPOST_IBVERBS_INCLUDE_DIR}', "
      "libibverbs: '${MESHPOST_IBVERBS_LIBRARY}'). Install rdma-core development files "
      "(Debian/Ubuntu: apt-get install libibverbs-dev; RHEL: dnf install rdma-core-devel) "
      "or configure with -DMESHPOST_WITH_RDMA=OFF.")
  else()
    message(STATUS "meshpost: libibverbs not found; RDMA van disabled (MESHPOST_WITH_RDMA=AUTO)")
  endif()
endif()

if(MESHPOST_HAVE_RDMA)
  message(STATUS "meshpost: RDMA van enabled (${MESHPOST_IBVERBS_LIBRARY})")
  add_library(meshpost_rdma STATIC
    ${CMAKE_CURRENT_LIST_DIR}/../van/rdma/verbs_ibv.cc
    ${CMAKE_CURRENT_LIST_DIR}/../van/rdma/mr_cache.cc
    ${CMAKE_CURRENT_LIST_DIR}/../van/rdma/rdma_wire.cc
    ${CMAKE_CURRENT_LIST_DIR}/../van/rdma/rdma_options.cc
    ${CMAKE_CURRENT_LIST_DIR}/../van/rdma/rdma_transport.cc
    ${CMAKE_CURRENT_LIST_DIR}/../van/rdma/rdma_van.cc)
  target_include_directories(meshpost_rdma PRIVATE ${MESHPOST_IBVERBS_INCLUDE_DIR})
  target_link_libraries(meshpost_rdma PUBLIC meshpost_van PRIVATE ${MESHPOST_IBVERBS_LIBRARY})
endif()
