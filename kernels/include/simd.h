// Portable builds with fast paths: RESPIN_TARGET_CLONES compiles a hot function once per x86-64
// micro-architecture level and lets the dynamic loader pick the best one for the running CPU
// (GCC function multi-versioning through an ifunc: the runtime CPU check). Only integer code
// and code whose float operations do not depend on the instruction set may carry it; the build
// adds -ffp-contract=off so no clone fuses a*b + c into an FMA. RESPIN_HAVE_CLONES also gates the
// explicit AVX512-VNNI variant of QMatMul (qmatmul.cc).
#pragma once

#if defined(__GNUC__) && __GNUC__ >= 12 && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(RESPIN_NO_TARGET_CLONES)
#define RESPIN_HAVE_CLONES 1
#define RESPIN_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RESPIN_TARGET_CLONES
#endif
