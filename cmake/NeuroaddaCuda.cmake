# Decide whether the CUDA kernels are built. Must run before any target is created.
#   NEUROADDA_ENABLE_CUDA=AUTO (default): build them when nvcc is found.
#   NEUROADDA_ENABLE_CUDA=ON: nvcc is required; configure fails without it.
#   NEUROADDA_ENABLE_CUDA=OFF: CPU only.
set(NEUROADDA_ENABLE_CUDA "AUTO" CACHE STRING "Build the CUDA kernels: AUTO, ON or OFF")
set_property(CACHE NEUROADDA_ENABLE_CUDA PROPERTY STRINGS AUTO ON OFF)
set(NEUROADDA_CUDA_ARCHITECTURES "75-real;80-real;86-real;89-real;90" CACHE STRING
    "CUDA architectures for the kernels (CMAKE_CUDA_ARCHITECTURES wins when set)")
string(TOUPPER "${NEUROADDA_ENABLE_CUDA}" _neuroadda_cuda_mode)

set(NEUROADDA_WITH_CUDA OFF)
if(NOT _neuroadda_cuda_mode MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR "NEUROADDA_ENABLE_CUDA must be AUTO, ON or OFF, got '${NEUROADDA_ENABLE_CUDA}'")
endif()

if(NOT _neuroadda_cuda_mode STREQUAL "OFF")
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES OR CMAKE_CUDA_ARCHITECTURES STREQUAL "")
      set(CMAKE_CUDA_ARCHITECTURES "${NEUROADDA_CUDA_ARCHITECTURES}")
    endif()
    set(CMAKE_CUDA_STANDARD 17)
    set(CMAKE_CUDA_STANDARD_REQUIRED ON)
    set(CMAKE_CUDA_RUNTIME_LIBRARY Static)
    enable_language(CUDA)
    find_package(CUDAToolkit REQUIRED)
    set(NEUROADDA_WITH_CUDA ON)
    message(STATUS "neuroadda_rt: CUDA kernels ON (nvcc ${CMAKE_CUDA_COMPILER_VERSION}, archs ${CMAKE_CUDA_ARCHITECTURES})")
  elseif(_neuroadda_cuda_mode STREQUAL "ON")
    message(FATAL_ERROR "NEUROADDA_ENABLE_CUDA=ON but no CUDA compiler (nvcc) was found. "
                        "Put nvcc on PATH or set CMAKE_CUDA_COMPILER, or use NEUROADDA_ENABLE_CUDA=AUTO/OFF.")
  else()
    message(STATUS "neuroadda_rt: CUDA kernels OFF (NEUROADDA_ENABLE_CUDA=AUTO and no nvcc found)")
  endif()
else()
  message(STATUS "neuroadda_rt: CUDA kernels OFF (NEUROADDA_ENABLE_CUDA=OFF)")
endif()
