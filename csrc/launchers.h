// launchers.h: the extern "C" launchers of csrc/*.cu, as seen by bindings.cpp (torch glue).
// Each takes raw pointers, sizes, a NovaDType code and a cudaStream_t (void*), and returns a
// cudaError_t as int. Every op appends its launchers here.
#pragma once
#include <cstdint>

enum NovaDType : int { NOVA_F32 = 0, NOVA_F16 = 1, NOVA_BF16 = 2 };

extern "C" {
}
