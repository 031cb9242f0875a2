// Shared math of mythos-rt's cpu row kernels (decode_row.cpp): the thread team, 16-float
// vectors, matrix products over the kernels' weight layouts, softmax pieces, SwiGLU,
// attention over a cache and RoPE. Header-only, included by decode_row.cpp alone (one
// translation unit: everything inlines); compiled with it by mythos_rt.cpu.native.
//
// Vectors: GCC/Clang vector extensions, so the same source compiles to AVX-512 where
// the CPU has it (-march=native) and to pairs of AVX2 registers where it does not; the
// lanes, and so every sum's order, are the same on both.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

// This thread's scratch of at least n floats (grows once, then reused: no allocation in
// steady state, and concurrent callers on different threads never share it).
float* scratch(size_t n) {
  thread_local std::vector<float> buffer;
  if (buffer.size() < n) buffer.resize(n);
  return buffer.data();
}

// The team a kernel splits its work over: OpenMP's threads (torch's own pool when both
// use the same libgomp, so torch.set_num_threads applies) once set_parallel(1) allowed
// it, else the caller alone. One row's work is a few hundred kilobytes: a few threads
// share it well (measured on 2 cores), many would spend more on waking and waiting than
// they save. Splits are static, so a given team size always sums in the same order.
int parallel_allowed = 0;
constexpr int kMaxTeam = 4;

int team_size() {
#ifdef _OPENMP
  return parallel_allowed ? std::min(omp_get_max_threads(), kMaxTeam) : 1;
#else
  return 1;
#endif
}

int team_rank() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

int team_count() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

void team_barrier() {
#ifdef _OPENMP
#pragma omp barrier
#endif
}

// Member t of T's share [lo, hi) of n items, in blocks of `block` (vector-aligned splits).
void share(int n, int t, int T, int block, int& lo, int& hi) {
  const int blocks = (n + block - 1) / block;
  lo = std::min(n, (blocks * t / T) * block);
  hi = std::min(n, (blocks * (t + 1) / T) * block);
}

// 16 floats as one vector (GCC/Clang vector extension: AVX-512 registers where the CPU
// has them, pairs of AVX registers or narrower elsewhere), loaded from any address.
typedef float v16 __attribute__((vector_size(64)));

inline v16 load16(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store16(float* p, v16 v) { std::memcpy(p, &v, sizeof v); }

// bfloat16 weights (their bits): widened to float32 in registers, so a bf16 matrix is
// half the bytes to stream and every product still sums in float32.
typedef uint16_t bf16;

inline v16 load16(const bf16* p) {
  typedef uint16_t h16 __attribute__((vector_size(32)));
  typedef int32_t i16 __attribute__((vector_size(64)));
  h16 h;
  std::memcpy(&h, p, sizeof h);
  return (v16)(__builtin_convertvector(h, i16) << 16);  // a same-size cast: the bits as floats
}

inline float to_float(float v) { return v; }

inline float to_float(bf16 v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// float32 -> bfloat16 as torch rounds it: to nearest, ties to even; NaN stays a (quiet) NaN.
inline bf16 to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return static_cast<bf16>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// o = v in the storage type (bf16: rounded to nearest even, as torch rounds).
inline void put(float& o, float v) { o = v; }
inline void put(bf16& o, float v) { o = to_bf16(v); }

// dst[i] = src[i] for i < n, into a cache row of either storage type.
inline void store_row(float* dst, const float* src, int n) {
  std::memcpy(dst, src, sizeof(float) * n);
}

inline void store_row(bf16* dst, const float* src, int n) {
  for (int i = 0; i < n; ++i) dst[i] = to_bf16(src[i]);
}

inline float hsum(v16 v) {  // a fixed tree: deterministic
#if defined(__clang__) || __GNUC__ >= 12
  typedef float v8 __attribute__((vector_size(32)));
  typedef float v4 __attribute__((vector_size(16)));
  const v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4 b =
      __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
#else
  const float a0 = (v[0] + v[8]) + (v[4] + v[12]), a1 = (v[1] + v[9]) + (v[5] + v[13]);
  const float a2 = (v[2] + v[10]) + (v[6] + v[14]), a3 = (v[3] + v[11]) + (v[7] + v[15]);
  return (a0 + a2) + (a1 + a3);
#endif
}

// Tile of gemm_kn: NR rows of X by NC 16-column chunks of Y, its NR·NC vector sums kept
// in registers for the whole reduction over K (AVX-512 has 32 of them; two-register
// vectors elsewhere halve that).
#ifdef __AVX512F__
constexpr int kTileRows = 4, kTileChunks = 4;
#else
constexpr int kTileRows = 2, kTileChunks = 2;
#endif

// Y[n][c..c+16·NC) for NR rows: Σ_k X[n][k] · w[k][c..] in order k = 0, 1, ..., each
// loaded chunk of w serving NR rows and each X[n][k] NC chunks. Every output sums in the
// same order whatever the tile, so tiling (and the team's split) never changes a result.
template <int NR, int NC>
inline void tile_kn(const float* __restrict X, int ldx, const float* __restrict w, int K,
                    int ld, float* __restrict Y, int ldy, bool accumulate) {
  v16 acc[NR][NC];
  for (int r = 0; r < NR; ++r)
    for (int j = 0; j < NC; ++j)
      acc[r][j] = accumulate ? load16(Y + static_cast<int64_t>(r) * ldy + 16 * j) : v16{};
  for (int k = 0; k < K; ++k) {
    const float* wk = w + static_cast<int64_t>(k) * ld;
    v16 wc[NC];
    for (int j = 0; j < NC; ++j) wc[j] = load16(wk + 16 * j);
    for (int r = 0; r < NR; ++r) {
      const float xk = X[static_cast<int64_t>(r) * ldx + k];
      for (int j = 0; j < NC; ++j) acc[r][j] += xk * wc[j];
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int j = 0; j < NC; ++j) store16(Y + static_cast<int64_t>(r) * ldy + 16 * j, acc[r][j]);
}

// Y[n] = X[n] · w (+ Y[n] when accumulate) for N rows (X rows ldx apart, Y rows ldy
// apart), w (K, cols) with rows ld apart (ld = cols for a whole matrix, wider for a block
// of its columns), in register tiles (tile_kn): each chunk of w is read once per tile of
// rows, so the weights cross memory once per call (a few times from cache), not once
// per row. Columns past the last whole chunk are summed one at a time, in the same order.
void gemm_kn(const float* __restrict X, int ldx, int N, const float* __restrict w, int K,
             int cols, int ld, float* __restrict Y, int ldy, bool accumulate) {
  int c = 0;
  for (; c + 16 * kTileChunks <= cols; c += 16 * kTileChunks) {
    int n = 0;
    for (; n + kTileRows <= N; n += kTileRows)
      tile_kn<kTileRows, kTileChunks>(X + static_cast<int64_t>(n) * ldx, ldx, w + c, K, ld,
                                      Y + static_cast<int64_t>(n) * ldy + c, ldy, accumulate);
    for (; n < N; ++n)
      tile_kn<1, kTileChunks>(X + static_cast<int64_t>(n) * ldx, ldx, w + c, K, ld,
                              Y + static_cast<int64_t>(n) * ldy + c, ldy, accumulate);
  }
  for (; c + 16 <= cols; c += 16)
    for (int n = 0; n < N; ++n)
      tile_kn<1, 1>(X + static_cast<int64_t>(n) * ldx, ldx, w + c, K, ld,
                    Y + static_cast<int64_t>(n) * ldy + c, ldy, accumulate);
  for (; c < cols; ++c)
    for (int n = 0; n < N; ++n) {
      const float* x = X + static_cast<int64_t>(n) * ldx;
      float* y = Y + static_cast<int64_t>(n) * ldy + c;
      float s = accumulate ? *y : 0.f;
      for (int k = 0; k < K; ++k) s += x[k] * w[static_cast<int64_t>(k) * ld + c];
      *y = s;
    }
}

// y = x · w (+ y when accumulate) for one row: gemm_kn with N = 1.
inline void gemv_kn(const float* x, const float* w, int K, int N, int ld, float* y,
                    bool accumulate) {
  gemm_kn(x, K, 1, w, K, N, ld, y, N, accumulate);
}

float dot(const float* __restrict a, const float* __restrict b, int n) {
  v16 acc = {};
  int i = 0;
  for (; i + 16 <= n; i += 16) acc += load16(a + i) * load16(b + i);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// The register-width part of a v16 that tile_sums sums in: all 16 lanes with AVX-512, 8
// elsewhere. GCC keeps an array of two-register v16 sums in memory (every update a
// store and a reload: the AVX2 products ran at a third of the read bandwidth); arrays of
// register-width parts stay in registers. The lanes, so the sums, are the same.
#ifdef __AVX512F__
constexpr int kPart = 16;
#else
constexpr int kPart = 8;
#endif
typedef float vpart __attribute__((vector_size(4 * kPart)));
constexpr int kParts = 16 / kPart;  // parts of one v16

inline vpart load_part(const float* p) {
  vpart v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// bf16 weights two to a 32-bit lane: a lane holding the pair (w[2l], w[2l+1]) has
// w[2l+1]'s float bits in its high half (clear the low half) and w[2l]'s in its low half
// (shift it up). Two bit operations widen 2·kPart weights; unpacking them to one weight
// per lane first costs a shuffle each kPart, which made the bf16 products compute-bound
// at two thirds of the float32 ones' bandwidth on an AVX2 EPYC.
typedef uint32_t upart __attribute__((vector_size(4 * kPart)));

inline void load_pairs(const bf16* p, vpart& even, vpart& odd) {
  upart u;
  std::memcpy(&u, p, sizeof u);
  even = (vpart)(u << 16);  // same-size casts: the bits as floats
  odd = (vpart)(u & 0xffff0000u);
}

// bf16 products sum over blocks of 32: lane l (of 16) takes the block's element 2l, then
// 2l+1. The inputs are put in that order once per product (pair_inputs): a block's even
// elements, then its odd ones.
constexpr int kPairBlock = 32;

// The rows of X (M, K; rows ldx apart) in the pair order, into this thread's buffer (K
// apart); elements past the last whole block stay where they are.
const float* pair_inputs(const float* X, int ldx, int M, int K) {
  thread_local std::vector<float> paired;
  paired.resize(static_cast<size_t>(M) * K);
  for (int m = 0; m < M; ++m) {
    const float* x = X + static_cast<int64_t>(m) * ldx;
    float* y = paired.data() + static_cast<int64_t>(m) * K;
    int i = 0;
    for (; i + kPairBlock <= K; i += kPairBlock)
      for (int l = 0; l < kPairBlock / 2; ++l) {
        y[i + l] = x[i + 2 * l];
        y[i + kPairBlock / 2 + l] = x[i + 2 * l + 1];
      }
    for (; i < K; ++i) y[i] = x[i];
  }
  return paired.data();
}

// hsum of the v16 whose parts these are.
inline float hsum(const vpart (&parts)[kParts]) {
  v16 v;
  std::memcpy(&v, parts, sizeof v);
  return hsum(v);
}

// A tile's outputs: each of its NX·NW lane sums reduced by the fixed tree (hsum), plus
// the products of the columns from i (past the last whole vector block) to K in order,
// scaled by alpha, stored or added onto Y. Tile row j is w + j·ldw, its output Y[j·ldj].
template <int NW, int NX, class W>
inline void store_sums(const vpart (&acc)[NX][NW][kParts], const float* X, int ldx, const W* w,
                       int64_t ldw, int K, int i, float alpha, float* Y, int ldy, int ldj,
                       bool accumulate) {
  for (int x = 0; x < NX; ++x) {
    const float* xr = X + static_cast<int64_t>(x) * ldx;
    float* y = Y + static_cast<int64_t>(x) * ldy;
    for (int j = 0; j < NW; ++j) {
      const W* wr = w + j * ldw;
      float s = hsum(acc[x][j]);
      for (int t = i; t < K; ++t) s += to_float(wr[t]) * xr[t];
      float& o = y[static_cast<int64_t>(j) * ldj];
      o = accumulate ? o + alpha * s : alpha * s;
    }
  }
}

// Tiles of gemm_nk: NW rows of w against NX inputs, the NW·NX vector sums in registers.
// Every output's sum has one order whatever the tile: lane l sums k ≡ l (mod 16) in
// order (bf16: each 32-column block's elements 2l and 2l+1), then a fixed tree (hsum),
// then the tail past the last whole step.
#ifdef __AVX512F__
constexpr int kNkInputs = 4;  // 16 sums + 4 weight vectors + 1 input in 32 registers
#else
constexpr int kNkInputs = 1;  // 4·2 part sums + 4 weight parts + 1 input in 16 registers
#endif

// Columns one step of a tile's sums takes: 16 for float32 weights, a pair block for bf16.
template <class W>
constexpr int kNkStep = std::is_same_v<W, bf16> ? kPairBlock : 16;

// The tile's sums over the columns [k0, k1) (multiples of the step), added onto acc: a
// tile may stop after any step and resume with the same sums in the same order.
template <int NW, int NX>
inline void tile_sums(const float* __restrict X, int ldx, const float* __restrict w,
                      int64_t ldw, int k0, int k1, vpart (&acc)[NX][NW][kParts]) {
  for (int i = k0; i < k1; i += 16)
    for (int p = 0; p < kParts; ++p) {
      const int at = i + p * kPart;
      vpart wv[NW];
      for (int j = 0; j < NW; ++j) wv[j] = load_part(w + j * ldw + at);
      for (int x = 0; x < NX; ++x) {
        const vpart xv = load_part(X + static_cast<int64_t>(x) * ldx + at);
        for (int j = 0; j < NW; ++j) acc[x][j][p] += wv[j] * xv;
      }
    }
}

// bf16 weights, X in the pair order (pair_inputs).
template <int NW, int NX>
inline void tile_sums(const float* __restrict X, int ldx, const bf16* __restrict w,
                      int64_t ldw, int k0, int k1, vpart (&acc)[NX][NW][kParts]) {
  constexpr int half = kPairBlock / 2;
  for (int i = k0; i < k1; i += kPairBlock)
    for (int p = 0; p < kParts; ++p) {
      vpart even[NW], odd[NW];
      for (int j = 0; j < NW; ++j)
        load_pairs(w + j * ldw + i + 2 * kPart * p, even[j], odd[j]);
      for (int x = 0; x < NX; ++x) {
        const float* xr = X + static_cast<int64_t>(x) * ldx + i + kPart * p;
        const vpart xe = load_part(xr), xo = load_part(xr + half);
        for (int j = 0; j < NW; ++j) {
          acc[x][j][p] += even[j] * xe;
          acc[x][j][p] += odd[j] * xo;
        }
      }
    }
}

// One tile whole: its sums over every step, then the outputs.
template <int NW, int NX, class W>
inline void tile_of(const float* X, int ldx, const W* w, int64_t ldw, int K, float alpha,
                    float* Y, int ldy, int ldj, bool accumulate) {
  vpart acc[NX][NW][kParts] = {};
  const int body = K - K % kNkStep<W>;
  tile_sums<NW, NX>(X, ldx, w, ldw, 0, body, acc);
  store_sums<NW, NX>(acc, X, ldx, w, ldw, K, body, alpha, Y, ldy, ldj, accumulate);
}

// One stretch [k0, k1) of a tile's sums, resumed from and saved to ``saved`` (NX·NW·kParts
// parts; started from zero when ``first``).
template <int NW, int NX, class W>
inline void tile_stretch(const float* X, int ldx, const W* w, int64_t ldw, int k0, int k1,
                         vpart* saved, bool first) {
  vpart acc[NX][NW][kParts] = {};
  if (!first) std::memcpy(acc, saved, sizeof acc);
  tile_sums<NW, NX>(X, ldx, w, ldw, k0, k1, acc);
  std::memcpy(saved, acc, sizeof acc);
}

// Columns of a K-blocked tile (gemm_nk with several inputs): four rows of 512 columns are
// 8 KiB in float32, so they stay in L1 while every input passes. Whole rows of 2048
// (32 KiB) did not: each input re-read the tile from L2.
constexpr int kNkBlockK = 512;
constexpr int kNkBlockMaxInputs = 64;

// Y[i][r] = alpha · (w[r, :] · X[i]) (+ Y[i][r] when accumulate) for the rows r < N of
// w (N, K) row-major (nn.Linear's layout; float32 or bf16) and inputs i < M (X rows ldx
// apart, Y rows ldy apart), in register tiles of four rows. w streams through memory once
// as four long streams: its rows split in quarters and a tile takes the same row of each.
// Four adjacent rows would restart four short streams every tile (a bf16 row of 2048 is
// one 4 KB page), which held one AVX2 EPYC thread to 14-16 GB/s against 20-22 as four
// long streams (the read floor's pattern, stream_sum). The streaming layout of decode: a
// team splits w's rows, so each member reads its own contiguous stretch of the matrix.
// With more inputs than one tile takes, a tile walks K in blocks of kNkBlockK, every
// input's sums saved between blocks: the same sums in the same order, the block in L1.
template <class W>
void gemm_nk(const float* __restrict X, int ldx, int M, const W* __restrict w, int N, int K,
             float alpha, float* __restrict Y, int ldy, bool accumulate) {
  if constexpr (std::is_same_v<W, bf16>) {
    X = pair_inputs(X, ldx, M, K);
    ldx = K;
  }
  const int Q = N / 4;  // four streams: tile row j is row n + j·Q
  const int64_t ldw = static_cast<int64_t>(Q) * K;
  const int body = K - K % kNkStep<W>;
  if (M > kNkInputs && M <= kNkBlockMaxInputs && body > kNkBlockK) {
    constexpr int per_input = 4 * kParts;  // one input's saved sums
    thread_local std::vector<vpart> saved;
    saved.resize(static_cast<size_t>(M) * per_input);
    for (int n = 0; n < Q; ++n) {
      const W* wn = w + static_cast<int64_t>(n) * K;
      for (int k0 = 0; k0 < body; k0 += kNkBlockK) {
        const int k1 = std::min(body, k0 + kNkBlockK);
        int m = 0;
        for (; m + kNkInputs <= M; m += kNkInputs)
          tile_stretch<4, kNkInputs>(X + static_cast<int64_t>(m) * ldx, ldx, wn, ldw, k0, k1,
                                     saved.data() + m * per_input, k0 == 0);
        for (; m < M; ++m)
          tile_stretch<4, 1>(X + static_cast<int64_t>(m) * ldx, ldx, wn, ldw, k0, k1,
                             saved.data() + m * per_input, k0 == 0);
      }
      for (int m = 0; m < M; ++m) {
        vpart acc[1][4][kParts];
        std::memcpy(acc, saved.data() + m * per_input, sizeof acc);
        store_sums<4, 1>(acc, X + static_cast<int64_t>(m) * ldx, ldx, wn, ldw, K, body, alpha,
                         Y + static_cast<int64_t>(m) * ldy + n, ldy, Q, accumulate);
      }
    }
  } else {
    for (int n = 0; n < Q; ++n) {
      const W* wn = w + static_cast<int64_t>(n) * K;
      int m = 0;
      for (; m + kNkInputs <= M; m += kNkInputs)
        tile_of<4, kNkInputs>(X + static_cast<int64_t>(m) * ldx, ldx, wn, ldw, K, alpha,
                              Y + static_cast<int64_t>(m) * ldy + n, ldy, Q, accumulate);
      for (; m < M; ++m)
        tile_of<4, 1>(X + static_cast<int64_t>(m) * ldx, ldx, wn, ldw, K, alpha,
                      Y + static_cast<int64_t>(m) * ldy + n, ldy, Q, accumulate);
    }
  }
  for (int n = 4 * Q; n < N; ++n)
    for (int m = 0; m < M; ++m)
      tile_of<1, 1>(X + static_cast<int64_t>(m) * ldx, ldx, w + static_cast<int64_t>(n) * K, K,
                    K, alpha, Y + static_cast<int64_t>(m) * ldy + n, ldy, 1, accumulate);
}

// y[n] = alpha · (w[n, :] · x) (+ y[n] when accumulate) for one input: gemm_nk with M = 1.
inline void gemv_nk(const float* x, const float* w, int N, int K, float alpha, float* y,
                    bool accumulate) {
  gemm_nk(x, K, 1, w, N, K, alpha, y, N, accumulate);
}

float inv_rms(const float* x, int n, float eps) {
  return 1.0f / std::sqrt(dot(x, x, n) / static_cast<float>(n) + eps);
}

// exp of 16 floats: 2^n · e^r with n = round(x·log2 e) and |r| ≤ ln2/2, e^r by the classic
// (Cephes) degree-7 polynomial, about 1 ulp; inputs clamped to [-87.3, 88.3], the floats
// whose exp is a normal float.
typedef int32_t vi16 __attribute__((vector_size(64)));

inline v16 exp16(v16 x) {
  const v16 lo = x < -87.3f ? v16{} - 87.3f : x;  // the comparison is a lane mask
  x = lo > 88.3f ? v16{} + 88.3f : lo;
  const float shifter = 12582912.0f;  // 1.5·2^23: adding it rounds to an integer
  v16 n = x * 1.44269504088896341f + shifter;
  vi16 bits;
  std::memcpy(&bits, &n, sizeof bits);
  n -= shifter;
  const v16 r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  v16 y = 1.9875691500e-4f * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const vi16 scale = (bits - 0x4B400000 + 127) << 23;  // 2^n as float bits
  v16 two_n;
  std::memcpy(&two_n, &scale, sizeof two_n);
  return y * two_n;
}

float max_of(const float* x, int n) {
  float top = x[0];
  int i = 0;
  if (n >= 16) {
    v16 m = load16(x);
    for (i = 16; i + 16 <= n; i += 16) {
      const v16 v = load16(x + i);
      m = v > m ? v : m;
    }
    for (int l = 0; l < 16; ++l) top = m[l] > top ? m[l] : top;
  }
  for (; i < n; ++i) top = x[i] > top ? x[i] : top;
  return top;
}

// x[i] = exp(x[i] - shift) for i < n; returns their sum.
float exp_shifted(float* x, int n, float shift) {
  v16 acc = {};
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    const v16 e = exp16(load16(x + i) - shift);
    store16(x + i, e);
    acc += e;
  }
  float total = hsum(acc);
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - shift);
    total += x[i];
  }
  return total;
}

// act[i] = silu(gate[i]) · up[i] = gate / (1 + e^-gate) · up, for i < n.
void swiglu(const float* gate, const float* up, int n, float* act) {
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    const v16 g = load16(gate + i);
    store16(act + i, g / (1.0f + exp16(-g)) * load16(up + i));
  }
  for (; i < n; ++i) act[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

// scores[h·L + j] = q_h · key_j for NH heads (rows of q, W wide) and keys j < L (W wide,
// key_j = keys + j·stride; float32 or bf16): each key is read once for all NH heads.
template <int NH, class C>
void scores_of(const float* q, const C* keys, int W, int64_t stride, int L, float* scores) {
  for (int j = 0; j < L; ++j) {
    const C* key = keys + j * stride;
    v16 acc[NH] = {};
    int i = 0;
    for (; i + 16 <= W; i += 16) {
      const v16 k = load16(key + i);
      for (int h = 0; h < NH; ++h) acc[h] += load16(q + h * W + i) * k;
    }
    for (int h = 0; h < NH; ++h) {
      float s = hsum(acc[h]);
      for (int t = i; t < W; ++t) s += q[h * W + t] * to_float(key[t]);
      scores[h * L + j] = s;
    }
  }
}

// o[c] = Σ_j p[j] · values_j[c] for c < 16·NV, values_j = values + j·stride.
template <int NV, class C>
void weighted_sum(const float* p, const C* values, int64_t stride, int L, float* o) {
  v16 even[NV] = {}, odd[NV] = {};  // two chains per column block: half the FMA latency
  int j = 0;
  for (; j + 2 <= L; j += 2) {
    const C* v = values + j * stride;
    for (int c = 0; c < NV; ++c) {
      even[c] += p[j] * load16(v + 16 * c);
      odd[c] += p[j + 1] * load16(v + stride + 16 * c);
    }
  }
  if (j < L)
    for (int c = 0; c < NV; ++c) even[c] += p[j] * load16(values + j * stride + 16 * c);
  for (int c = 0; c < NV; ++c) store16(o + 16 * c, even[c] + odd[c]);
}

// Attention of H query rows (q, Wk wide) over L cached tokens (float32 or bf16), token
// j's key at keys + j·stride (Wk wide) and its value at values + j·stride (Wv wide):
// o (H, Wv) = softmax(q·keysᵀ) · values, summed in float32. scores: scratch (H, L).
template <class C>
void attend(const float* q, int H, const C* keys, int Wk, const C* values, int Wv,
            int64_t stride, int L, float* scores, float* o) {
  int h = 0;
  for (; h + 4 <= H; h += 4) scores_of<4>(q + h * Wk, keys, Wk, stride, L, scores + h * L);
  for (; h < H; ++h) scores_of<1>(q + h * Wk, keys, Wk, stride, L, scores + h * L);
  for (h = 0; h < H; ++h) {
    float* sc = scores + h * L;
    const float top = max_of(sc, L);
    const float inv = 1.0f / exp_shifted(sc, L, top);
    for (int j = 0; j < L; ++j) sc[j] *= inv;
    float* oh = o + h * Wv;
    int c = 0;
    for (; c + 64 <= Wv; c += 64) weighted_sum<4>(sc, values + c, stride, L, oh + c);
    for (; c + 16 <= Wv; c += 16) weighted_sum<1>(sc, values + c, stride, L, oh + c);
    for (; c < Wv; ++c) {
      float acc = 0.f;
      for (int j = 0; j < L; ++j) acc += sc[j] * to_float(values[j * stride + c]);
      oh[c] = acc;
    }
  }
}

// x's adjacent pairs times the phasors (cos + i·sin): the reference's complex RoPE.
void rotate(float* x, const float* cos, const float* sin, int pairs) {
  for (int i = 0; i < pairs; ++i) {
    const float a = x[2 * i], b = x[2 * i + 1];
    x[2 * i] = a * cos[i] - b * sin[i];
    x[2 * i + 1] = a * sin[i] + b * cos[i];
  }
}

}  // namespace
