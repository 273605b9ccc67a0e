// The counter-based generator of the CPU kernels: splitmix64's output function of seed + (index + 1) * golden gamma,
// so that any element's random bits are a pure function of (seed, index). sparse_peft/fused.py and the tests
// reproduce it in Python.
#pragma once

#include <cstdint>

inline uint64_t splitmix64(uint64_t seed, uint64_t index) {
  uint64_t z = seed + (index + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
