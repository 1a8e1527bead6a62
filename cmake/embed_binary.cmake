# cmake -DIN=file -DOUT=file.c -P embed_binary.cmake: writes IN's bytes as a C array
# meshpost_cuda_fatbin[] and its length meshpost_cuda_fatbin_size (no xxd/bin2c needed).
file(READ "${IN}" _hex HEX)
string(LENGTH "${_hex}" _len)
math(EXPR _size "${_len} / 2")
string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1," _bytes "${_hex}")
# The driver reads the fatbin in place: 8-byte alignment, as nvcc's own embedding uses.
file(WRITE "${OUT}"
  "/* Generated from ${IN} by cmake/embed_binary.cmake. */\n"
  "#include <stddef.h>\n"
  "__attribute__((aligned(8))) const unsigned char meshpost_cuda_fatbin[] = {${_bytes}};\n"
  "const size_t meshpost_cuda_fatbin_size = ${_size};\n")
