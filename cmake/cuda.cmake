# CUDA device backend (tensor/backend/cuda_backend.cc + cuda_kernels.cu). MESHPOST_WITH_CUDA:
#   AUTO (default) builds it when a CUDA toolkit (nvcc + cuda.h) is found,
#   ON fails the configure step without one, OFF never builds it.
# Nothing links libcuda or libcudart: the backend dlopens libcuda.so.1 at first use, and the
# kernels are a fatbin embedded in the library, loaded through the driver. A CUDA build
# therefore runs on machines without a GPU or driver (GPU tensors are refused with the
# reason). Sets MESHPOST_HAVE_CUDA (CMake variable and compile definition).
include(${CMAKE_CURRENT_LIST_DIR}/feature_option.cmake)
meshpost_feature_option(MESHPOST_WITH_CUDA "Build the CUDA device backend" _mp_cuda_mode)
set(MESHPOST_CUDA_ARCHS "80;89;90" CACHE STRING
    "SM architectures of the CUDA kernels (PTX of the last one is embedded too)")

set(MESHPOST_HAVE_CUDA OFF)
if(NOT _mp_cuda_mode STREQUAL "OFF")
  find_package(CUDAToolkit QUIET)
  if(CUDAToolkit_FOUND AND CUDAToolkit_NVCC_EXECUTABLE AND EXISTS "${CUDAToolkit_NVCC_EXECUTABLE}")
    set(MESHPOST_HAVE_CUDA ON)
  elseif(_mp_cuda_mode STREQUAL "ON")
    message(FATAL_ERROR
      "MESHPOST_WITH_CUDA=ON but no CUDA toolkit was found (need nvcc and cuda.h; looked on "
      "PATH, in CUDAToolkit_ROOT / CUDA_PATH and /usr/local/cuda). Install the CUDA toolkit, "
      "pass -DCUDAToolkit_ROOT=/path/to/cuda, or configure with -DMESHPOST_WITH_CUDA=OFF.")
  else()
    message(STATUS "meshpost: no CUDA toolkit found; CUDA backend disabled (MESHPOST_WITH_CUDA=AUTO)")
  endif()
endif()

if(MESHPOST_HAVE_CUDA)
  message(STATUS "meshpost: CUDA backend enabled (nvcc ${CUDAToolkit_VERSION}, sm ${MESHPOST_CUDA_ARCHS})")
  set(_mp_gencode)
  foreach(_arch IN LISTS MESHPOST_CUDA_ARCHS)
    list(APPEND _mp_gencode "-gencode=arch=compute_${_arch},code=sm_${_arch}")
    set(_mp_last_arch ${_arch})
  endforeach()
  list(APPEND _mp_gencode "-gencode=arch=compute_${_mp_last_arch},code=compute_${_mp_last_arch}")
  set(_mp_cu "${CMAKE_CURRENT_LIST_DIR}/../tensor/backend/cuda_kernels.cu")
  set(_mp_fatbin "${CMAKE_CURRENT_BINARY_DIR}/meshpost_cuda_kernels.fatbin")
  set(_mp_fatbin_c "${CMAKE_CURRENT_BINARY_DIR}/meshpost_cuda_kernels_fatbin.c")
  add_custom_command(
    OUTPUT "${_mp_fatbin}"
    COMMAND "${CUDAToolkit_NVCC_EXECUTABLE}" --fatbin -O3 ${_mp_gencode} -o "${_mp_fatbin}" "${_mp_cu}"
    DEPENDS "${_mp_cu}"
    COMMENT "nvcc: CUDA kernels for sm ${MESHPOST_CUDA_ARCHS} + PTX"
    VERBATIM)
  add_custom_command(
    OUTPUT "${_mp_fatbin_c}"
    COMMAND "${CMAKE_COMMAND}" -DIN=${_mp_fatbin} -DOUT=${_mp_fatbin_c}
            -P "${CMAKE_CURRENT_LIST_DIR}/embed_binary.cmake"
    DEPENDS "${_mp_fatbin}" "${CMAKE_CURRENT_LIST_DIR}/embed_binary.cmake"
    VERBATIM)
  enable_language(C)
  target_sources(meshpost_tensor PRIVATE
    ${CMAKE_CURRENT_LIST_DIR}/../tensor/backend/cuda_backend.cc "${_mp_fatbin_c}")
  # cuda.h for the driver API types only; the library is dlopened.
  target_include_directories(meshpost_tensor PRIVATE ${CUDAToolkit_INCLUDE_DIRS})
  target_compile_definitions(meshpost_tensor PUBLIC MESHPOST_HAVE_CUDA=1)
  target_link_libraries(meshpost_tensor PRIVATE ${CMAKE_DL_LIBS})
endif()
