// The most int8 multiply-adds per second one core does with AVX2's q8_0 instruction pair
// (vpmaddubsw, then vpmaddwd to i32), with nothing else in the loop: the ceiling for any
// q8_0 kernel on a CPU without VNNI (docs/benchmarks.md, "the AVX2 kernel on the VNNI
// layout"). Eight independent chains hide the latencies.
//
//   gcc -O3 -mavx2 scripts/int8-peak.c -o /tmp/int8-peak && /tmp/int8-peak
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(void) {
    __m256i a = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
    __m256i b[8], acc[8];
    for (int i = 0; i < 8; i++) {
        b[i] = _mm256_set1_epi8((char)(i + 1));
        acc[i] = _mm256_setzero_si256();
    }
    const long rounds = 200000000;
    double start = now();
    for (long k = 0; k < rounds; k++) {
        for (int i = 0; i < 8; i++) {
            __m256i pairs = _mm256_maddubs_epi16(a, b[i]);
            acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(pairs, ones));
        }
        __asm__ volatile("" : "+x"(a)); // keeps the products inside the loop
    }
    double seconds = now() - start;
    __m256i sum = acc[0];
    for (int i = 1; i < 8; i++) sum = _mm256_add_epi32(sum, acc[i]);
    // Each vpmaddubsw multiplies 32 byte pairs.
    printf("%.1f G multiply-adds/s on one core (checksum %d)\n",
           rounds * 8.0 * 32 / seconds / 1e9, _mm256_extract_epi32(sum, 0));
    return 0;
}
