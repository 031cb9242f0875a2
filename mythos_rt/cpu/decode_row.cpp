// Row kernels of mythos-rt's cpu backend (decode steps, and prefill's norms and loop
// epilogues), float32.
//
// Why: a decode sublayer is a handful of small matrix-vector products per row, and the
// PyTorch calls that would run them cost more than their arithmetic. Each function here
// runs a whole sublayer for all of a step's rows in one call over the layouts that
// mythos_rt.cpu's ``prepare`` functions build, so they give the same answers as the
// torch-level cpu ops up to summation order. They split their work over a few OpenMP
// threads when allowed (set_parallel). Compiled on the machine that runs it
// (mythos_rt.cpu.native, -O3 -march=native [-fopenmp]) and called through ctypes: plain
// C ABI, no Python or torch headers.
//
// The structs mirror the ctypes.Structure classes of mythos_rt/cpu/native.py field for
// field; change both together.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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

// Y[i][r] = alpha · (w[r, :] · X[i]) (+ Y[i][r] when accumulate) for the rows r < N of w
// (N, K) row-major and inputs i < M (X rows ldx apart, Y rows ldy apart): four rows of w
// at a time, each read once for all M inputs, their sums running side by side.
void gemm_nk(const float* __restrict X, int ldx, int M, const float* __restrict w, int N, int K,
             float alpha, float* __restrict Y, int ldy, bool accumulate) {
  int n = 0;
  for (; n + 4 <= N; n += 4) {
    const float* r0 = w + static_cast<int64_t>(n) * K;
    const float* r1 = r0 + K;
    const float* r2 = r1 + K;
    const float* r3 = r2 + K;
    for (int m = 0; m < M; ++m) {
      const float* x = X + static_cast<int64_t>(m) * ldx;
      float* y = Y + static_cast<int64_t>(m) * ldy + n;
      v16 a0 = {}, a1 = {}, a2 = {}, a3 = {};
      int i = 0;
      for (; i + 16 <= K; i += 16) {
        const v16 xi = load16(x + i);
        a0 += load16(r0 + i) * xi;
        a1 += load16(r1 + i) * xi;
        a2 += load16(r2 + i) * xi;
        a3 += load16(r3 + i) * xi;
      }
      float s[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
      for (; i < K; ++i) {
        s[0] += r0[i] * x[i];
        s[1] += r1[i] * x[i];
        s[2] += r2[i] * x[i];
        s[3] += r3[i] * x[i];
      }
      for (int j = 0; j < 4; ++j) y[j] = accumulate ? y[j] + alpha * s[j] : alpha * s[j];
    }
  }
  for (; n < N; ++n)
    for (int m = 0; m < M; ++m) {
      const float v =
          alpha * dot(w + static_cast<int64_t>(n) * K, X + static_cast<int64_t>(m) * ldx, K);
      float* y = Y + static_cast<int64_t>(m) * ldy + n;
      *y = accumulate ? *y + v : v;
    }
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
// key_j = keys + j·stride): each key is read once for all NH heads.
template <int NH>
void scores_of(const float* q, const float* keys, int W, int64_t stride, int L,
               float* scores) {
  for (int j = 0; j < L; ++j) {
    const float* key = keys + j * stride;
    v16 acc[NH] = {};
    int i = 0;
    for (; i + 16 <= W; i += 16) {
      const v16 k = load16(key + i);
      for (int h = 0; h < NH; ++h) acc[h] += load16(q + h * W + i) * k;
    }
    for (int h = 0; h < NH; ++h) {
      float s = hsum(acc[h]);
      for (int t = i; t < W; ++t) s += q[h * W + t] * key[t];
      scores[h * L + j] = s;
    }
  }
}

// o[c] = Σ_j p[j] · values_j[c] for c < 16·NV, values_j = values + j·stride.
template <int NV>
void weighted_sum(const float* p, const float* values, int64_t stride, int L, float* o) {
  v16 even[NV] = {}, odd[NV] = {};  // two chains per column block: half the FMA latency
  int j = 0;
  for (; j + 2 <= L; j += 2) {
    const float* v = values + j * stride;
    for (int c = 0; c < NV; ++c) {
      even[c] += p[j] * load16(v + 16 * c);
      odd[c] += p[j + 1] * load16(v + stride + 16 * c);
    }
  }
  if (j < L)
    for (int c = 0; c < NV; ++c) even[c] += p[j] * load16(values + j * stride + 16 * c);
  for (int c = 0; c < NV; ++c) store16(o + 16 * c, even[c] + odd[c]);
}

// Attention of H query rows (q, Wk wide) over L cached tokens, token j's key at
// keys + j·stride (Wk wide) and its value at values + j·stride (Wv wide):
// o (H, Wv) = softmax(q·keysᵀ) · values. scores: scratch (H, L).
void attend(const float* q, int H, const float* keys, int Wk, const float* values, int Wv,
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
      for (int j = 0; j < L; ++j) acc += sc[j] * values[j * stride + c];
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

extern "C" {

// Whether this build has OpenMP, and whether the kernels may split their work over its
// threads (0: the calling thread alone).
int32_t has_openmp() {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

void set_parallel(int32_t on) { parallel_allowed = on; }

// The threads a kernel would use now.
int32_t team_threads() { return team_size(); }

// ------------------------------------------------------------------------------ RMSNorm

// Per row of N: s = x (+ residual), into residual_out when given;
// out = s · rsqrt(mean(s²) + eps) · w. out and residual_out may alias x or residual.
void rmsnorm_rows(const float* x, const float* residual, const float* w, float eps, int32_t N,
                  int32_t D, float* out, float* residual_out) {
  [[maybe_unused]] const int T = team_size();
#ifdef _OPENMP
#pragma omp parallel for num_threads(T) if (T > 1 && N >= 16)
#endif
  for (int n = 0; n < N; ++n) {
    const int64_t at = static_cast<int64_t>(n) * D;
    const float* s = x + at;
    if (residual != nullptr) {
      for (int d = 0; d < D; ++d) residual_out[at + d] = x[at + d] + residual[at + d];
      s = residual_out + at;
    }
    const float r = inv_rms(s, D, eps);
    for (int d = 0; d < D; ++d) out[at + d] = r * s[d] * w[d];
  }
}

// ------------------------------------------------------------------------------ MLA

struct MlaRow {
  int32_t D, H, R, P, q_lora, nope, v;
  float eps;
  const float* down_t;   // (D, P + R + q_lora): x -> [k_pe | latent | c_q]
  const float* kv_norm;  // (R,)
  const float* q_up_t;   // (q_lora, H·(P + Q)): c_q -> per head [q_pe | q_Q], scaled, where
                         // Q = R (w_uk absorbed: q_latent) or nope (w_uk given: q_nope)
  const float* w_uk;     // (H, nope, R): q_latent = q_nope · w_uk[h], or null (absorbed)
  const float* w_uv_t;   // (H, R, v): o_v = o_latent · w_uv_t[h], or null (absorbed)
  const float* o_t;      // (H·R, D) absorbed output projection, or woᵀ (H·v, D)
};

// B rows of one new token of MLA, row b over its own joint cache rows
// (cache + b·batch_stride: (S_max, P + R) = [k_pe | latent]) at position cache_lens[b]
// (read here, so a prebound call stays valid as the caches grow): project, normalize,
// rotate, store the new entries, attend, project out. The projections are one product
// over all B rows (the weights cross memory once); a team splits them by columns, the
// new entries by rows and the attention by heads. Returns 1, having touched nothing,
// when a position is outside the cache; else 0.
int32_t mla_decode_rows(const MlaRow* m, const float* x, float* cache, int64_t batch_stride,
                        const int32_t* cache_lens, int32_t B, int32_t S_max, const float* cos,
                        const float* sin, float* out) {
  int L_max = 0;
  for (int b = 0; b < B; ++b) {
    if (cache_lens[b] < 0 || cache_lens[b] >= S_max) return 1;
    L_max = std::max(L_max, cache_lens[b] + 1);
  }
  const int W = m->P + m->R, H = m->H, R = m->R, P = m->P, half = P / 2, D = m->D;
  const int Wq = m->w_uk != nullptr ? P + m->nope : W;  // q_up's width per head
  const int Vo = m->w_uv_t != nullptr ? m->v : R;       // o_t's rows per head
  const int down_n = W + m->q_lora;
  float* entry = scratch(static_cast<size_t>(B) * (down_n + H * (Wq + W + R + Vo)) +
                         static_cast<size_t>(H) * L_max);
  float* q_up = entry + static_cast<int64_t>(B) * down_n;  // (B, H·Wq)
  float* q = q_up + static_cast<int64_t>(B) * H * Wq;      // (B, H·W): [q_pe | q_latent]
  float* o = q + static_cast<int64_t>(B) * H * W;          // (B, H·R)
  float* o_v = o + static_cast<int64_t>(B) * H * R;        // (B, H·Vo)
  float* scores = o_v + static_cast<int64_t>(B) * H * Vo;  // (H, L_max), heads split by member
  [[maybe_unused]] const int T = std::min(team_size(), std::max(H, B));
#ifdef _OPENMP
#pragma omp parallel num_threads(T) if (T > 1)
#endif
  {
    const int t = team_rank(), nt = team_count();
    int lo, hi;
    share(down_n, t, nt, 16, lo, hi);  // entries [k_pe | latent | c_q] of every row
    gemm_kn(x, D, B, m->down_t + lo, D, hi - lo, down_n, entry + lo, down_n, false);
    team_barrier();
    int h0, h1;
    share(H, t, nt, 1, h0, h1);
    // This member's heads of every row's query: the up-projection (then w_uk, if given)
    // as one product over all B rows, so each weight is read once, not once per row.
    gemm_kn(entry + W, down_n, B, m->q_up_t + h0 * Wq, m->q_lora, (h1 - h0) * Wq, H * Wq,
            q_up + h0 * Wq, H * Wq, false);
    if (m->w_uk != nullptr)  // q_latent = q_nope · w_uk[h] (r_q applied below)
      for (int h = h0; h < h1; ++h)
        gemm_kn(q_up + h * Wq + P, H * Wq, B, m->w_uk + static_cast<int64_t>(h) * m->nope * R,
                m->nope, R, R, q + h * W + P, H * W, false);
    for (int b = 0; b < B; ++b) {
      const float r_q = inv_rms(entry + static_cast<int64_t>(b) * down_n + W, m->q_lora, m->eps);
      const float* c = cos + static_cast<int64_t>(cache_lens[b]) * half;
      const float* s = sin + static_cast<int64_t>(cache_lens[b]) * half;
      for (int h = h0; h < h1; ++h) {
        const float* u = q_up + (static_cast<int64_t>(b) * H + h) * Wq;
        float* qh = q + (static_cast<int64_t>(b) * H + h) * W;
        for (int i = 0; i < P; ++i) qh[i] = r_q * u[i];
        if (m->w_uk != nullptr)
          for (int i = P; i < W; ++i) qh[i] *= r_q;
        else
          for (int i = P; i < W; ++i) qh[i] = r_q * u[i];
        rotate(qh, c, s, half);
      }
    }
    share(B, t, nt, 1, lo, hi);
    for (int b = lo; b < hi; ++b) {  // this member's rows' new entries, into their slots
      float* e = entry + static_cast<int64_t>(b) * down_n;
      const int pos = cache_lens[b];
      const float r_kv = inv_rms(e + P, R, m->eps);
      for (int i = 0; i < R; ++i) e[P + i] = r_kv * e[P + i] * m->kv_norm[i];
      rotate(e, cos + static_cast<int64_t>(pos) * half, sin + static_cast<int64_t>(pos) * half,
             half);
      std::memcpy(cache + b * batch_stride + static_cast<int64_t>(pos) * W, e, sizeof(float) * W);
    }
    team_barrier();  // every entry is in its slot
    for (int b = 0; b < B; ++b) {
      const float* rows = cache + b * batch_stride;  // keys [k_pe | latent], values latent
      attend(q + static_cast<int64_t>(b) * H * W + h0 * W, h1 - h0, rows, W, rows + P, R, W,
             cache_lens[b] + 1, scores + h0 * L_max, o + static_cast<int64_t>(b) * H * R + h0 * R);
    }
    if (m->w_uv_t != nullptr)  // o_v[h] = o_latent[h] · w_uv_t[h], over all rows at once
      for (int h = h0; h < h1; ++h)
        gemm_kn(o + h * R, H * R, B, m->w_uv_t + static_cast<int64_t>(h) * R * Vo, R, Vo, Vo,
                o_v + h * Vo, H * Vo, false);
    team_barrier();
    share(D, t, nt, 16, lo, hi);
    gemm_kn(m->w_uv_t != nullptr ? o_v : o, H * Vo, B, m->o_t + lo, H * Vo, hi - lo, D, out + lo,
            D, false);
  }
  return 0;
}

// ------------------------------------------------------------------------------ GQA

struct GqaRow {
  int32_t D, H, Hkv, d;
  const float* qkv_t;  // (D, (H + 2·Hkv)·d): x -> [q · softmax scale | k | v]
  const float* o_t;    // (H·d, D) = woᵀ
};

// B rows of one new token of GQA, row b over its own caches (k_cache / v_cache +
// b·batch_stride: (S_max, Hkv, d), keys stored after RoPE) at position cache_lens[b]
// (read here, so a prebound call stays valid as the caches grow): project, rotate q and
// k, store the new k and v, attend (query head h reads kv head h / (H / Hkv)), project
// out. The projections are one product over all B rows; a team splits them by columns,
// the new entries by rows and the attention by (row, kv head). Returns 1, having touched
// nothing, when a position is outside the cache; else 0.
int32_t gqa_decode_rows(const GqaRow* m, const float* x, float* k_cache, float* v_cache,
                        int64_t batch_stride, const int32_t* cache_lens, int32_t B,
                        int32_t S_max, const float* cos, const float* sin, float* out) {
  int L_max = 0;
  for (int b = 0; b < B; ++b) {
    if (cache_lens[b] < 0 || cache_lens[b] >= S_max) return 1;
    L_max = std::max(L_max, cache_lens[b] + 1);
  }
  const int H = m->H, Hkv = m->Hkv, d = m->d, D = m->D, group = H / Hkv, half = d / 2;
  const int Wy = (H + 2 * Hkv) * d, Wkv = Hkv * d;  // a projected row; a cached token
  const int T = team_size();
  float* y = scratch(static_cast<size_t>(B) * (Wy + H * d) +
                     static_cast<size_t>(T) * group * L_max);
  float* o = y + static_cast<int64_t>(B) * Wy;               // (B, H·d)
  float* scores = o + static_cast<int64_t>(B) * H * d;      // (T, group, L_max)
#ifdef _OPENMP
#pragma omp parallel num_threads(T) if (T > 1)
#endif
  {
    const int t = team_rank(), nt = team_count();
    int lo, hi;
    share(Wy, t, nt, 16, lo, hi);  // [q | k | v] of every row
    gemm_kn(x, D, B, m->qkv_t + lo, D, hi - lo, Wy, y + lo, Wy, false);
    team_barrier();
    share(B, t, nt, 1, lo, hi);
    for (int b = lo; b < hi; ++b) {  // this member's rows: rotate q and k, store k and v
      float* yb = y + static_cast<int64_t>(b) * Wy;
      const int pos = cache_lens[b];
      const float* c = cos + static_cast<int64_t>(pos) * half;
      const float* s = sin + static_cast<int64_t>(pos) * half;
      for (int h = 0; h < H + Hkv; ++h) rotate(yb + h * d, c, s, half);
      const int64_t slot = b * batch_stride + static_cast<int64_t>(pos) * Wkv;
      std::memcpy(k_cache + slot, yb + H * d, sizeof(float) * Wkv);
      std::memcpy(v_cache + slot, yb + H * d + Wkv, sizeof(float) * Wkv);
    }
    team_barrier();  // every entry is in its slot
    share(B * Hkv, t, nt, 1, lo, hi);
    for (int i = lo; i < hi; ++i) {  // this member's (row, kv head) pairs
      const int b = i / Hkv, g = i % Hkv;
      const int64_t at = b * batch_stride + static_cast<int64_t>(g) * d;
      attend(y + static_cast<int64_t>(b) * Wy + g * group * d, group, k_cache + at, d,
             v_cache + at, d, Wkv, cache_lens[b] + 1,
             scores + static_cast<int64_t>(t) * group * L_max,
             o + static_cast<int64_t>(b) * H * d + g * group * d);
    }
    team_barrier();
    share(D, t, nt, 16, lo, hi);
    gemm_kn(o, H * d, B, m->o_t + lo, H * d, hi - lo, D, out + lo, D, false);
  }
  return 0;
}

// ------------------------------------------------------------------------------ MoE

struct MoeRow {
  int32_t D, E, S, I, k;
  const float* front_t;      // (D, S·2I + E): [shared slots' [gate | up] | router]ᵀ
  const float* front_bias;   // (S·2I + E,) = [0 | router bias]
  const float* router_bias;  // (E,)
  const float* w13;          // (E + S, 2I, D): per expert [gate; up]
  const float* w2;           // (E + S, D, I): per expert down
  const float* shared_w2_t;  // (S·I, D), null when S == 0
};

// The k largest of biased[0..E) in descending order (as torch.topk), and the softmax of
// their unbiased logits (biased - bias): the renormalized routing weights.
void route(const float* biased, const float* bias, int E, int k, int* chosen, float* weights) {
  for (int j = 0; j < k; ++j) {
    int best = -1;
    for (int e = 0; e < E; ++e) {
      bool taken = false;
      for (int i = 0; i < j; ++i) taken = taken || chosen[i] == e;
      if (!taken && (best < 0 || biased[e] > biased[best])) best = e;
    }
    chosen[j] = best;
  }
  float top = -INFINITY;
  for (int j = 0; j < k; ++j) {
    weights[j] = biased[chosen[j]] - bias[chosen[j]];
    top = weights[j] > top ? weights[j] : top;
  }
  float total = 0.f;
  for (int j = 0; j < k; ++j) {
    weights[j] = std::exp(weights[j] - top);
    total += weights[j];
  }
  for (int j = 0; j < k; ++j) weights[j] /= total;
}

// N tokens: router and shared experts' gate/up (one product over all N), the shared
// experts' down (one product), then Σ weight_j · down_j(silu(gate_j x) · up_j x) added on
// per token. The (token, expert) pairs are sorted by expert, so each run of one expert's
// tokens is one product over its weights (read once for the run, not once per token). A
// team splits the products by columns, the shared activations by tokens and the sorted
// pairs into equal contiguous shares (each member routes and sorts every token itself:
// the same answer, no wait), and sums the members' expert outputs at the end.
void moe_rows(const MoeRow* m, const float* x, int32_t N, float* out) {
  const int D = m->D, E = m->E, S = m->S, I = m->I, k = m->k, shared = S * 2 * I;
  const int F = shared + E;  // front width: [shared gate/up | biased router logits]
  const int T = std::max(1, team_size());
  // per member: routing weights, expert sums, then one run's gathered rows, gate/up,
  // activations and down outputs
  const int64_t own = static_cast<int64_t>(N) * (k + D + D + 2 * I + I + D);
  float* front = scratch(static_cast<size_t>(N) * (F + S * I) + static_cast<size_t>(T) * own);
  float* shared_act = front + static_cast<int64_t>(N) * F;  // (N, S·I)
  float* members = shared_act + static_cast<int64_t>(N) * S * I;
#ifdef _OPENMP
#pragma omp parallel num_threads(T) if (T > 1)
#endif
  {
    const int t = team_rank(), nt = team_count();
    thread_local std::vector<int> chosen, order, first;
    chosen.resize(static_cast<size_t>(N) * k);
    order.resize(static_cast<size_t>(N) * k);
    first.assign(static_cast<size_t>(E) + 1, 0);
    float* weights = members + static_cast<int64_t>(t) * own;  // (N·k,)
    float* partial = weights + static_cast<int64_t>(N) * k;     // (N, D)
    float* rows = partial + static_cast<int64_t>(N) * D;        // (≤ N, D)
    float* gate_up = rows + static_cast<int64_t>(N) * D;        // (≤ N, 2I)
    float* act = gate_up + static_cast<int64_t>(N) * 2 * I;     // (≤ N, I)
    float* down = act + static_cast<int64_t>(N) * I;            // (≤ N, D)
    int lo, hi;
    share(F, t, nt, 16, lo, hi);
    for (int n = 0; n < N; ++n)
      std::memcpy(front + static_cast<int64_t>(n) * F + lo, m->front_bias + lo,
                  sizeof(float) * (hi - lo));
    gemm_kn(x, D, N, m->front_t + lo, D, hi - lo, F, front + lo, F, true);
    team_barrier();  // the front is complete
    for (int n = 0; n < N; ++n)
      route(front + static_cast<int64_t>(n) * F + shared, m->router_bias, E, k,
            chosen.data() + n * k, weights + n * k);
    for (int pair = 0; pair < N * k; ++pair) ++first[chosen[pair] + 1];  // counting sort
    for (int e = 0; e < E; ++e) first[e + 1] += first[e];
    for (int pair = 0; pair < N * k; ++pair) order[first[chosen[pair]]++] = pair;
    share(N, t, nt, 1, lo, hi);
    for (int n = lo; n < hi; ++n)
      for (int s = 0; s < S; ++s) {
        const float* g = front + static_cast<int64_t>(n) * F + s * 2 * I;
        swiglu(g, g + I, I, shared_act + (static_cast<int64_t>(n) * S + s) * I);
      }
    team_barrier();  // so are the shared activations
    share(D, t, nt, 16, lo, hi);
    if (S > 0)
      gemm_kn(shared_act, S * I, N, m->shared_w2_t + lo, S * I, hi - lo, D, out + lo, D, false);
    else
      for (int n = 0; n < N; ++n)
        std::memset(out + static_cast<int64_t>(n) * D + lo, 0, sizeof(float) * (hi - lo));
    std::memset(partial, 0, sizeof(float) * N * D);
    int p0, p1;
    share(N * k, t, nt, 1, p0, p1);
    for (int a = p0; a < p1;) {  // this member's sorted pairs, one expert's run at a time
      const int64_t e = chosen[order[a]];
      int b = a;
      while (b < p1 && chosen[order[b]] == e) ++b;
      const int M = b - a;
      for (int r = 0; r < M; ++r)
        std::memcpy(rows + static_cast<int64_t>(r) * D,
                    x + static_cast<int64_t>(order[a + r] / k) * D, sizeof(float) * D);
      gemm_nk(rows, D, M, m->w13 + e * 2 * I * D, 2 * I, D, 1.0f, gate_up, 2 * I, false);
      for (int r = 0; r < M; ++r)
        swiglu(gate_up + static_cast<int64_t>(r) * 2 * I,
               gate_up + static_cast<int64_t>(r) * 2 * I + I, I, act + static_cast<int64_t>(r) * I);
      gemm_nk(act, I, M, m->w2 + e * D * I, D, I, 1.0f, down, D, false);
      for (int r = 0; r < M; ++r) {
        const int pair = order[a + r];
        float* y = partial + static_cast<int64_t>(pair / k) * D;
        const float* v = down + static_cast<int64_t>(r) * D;
        const float g = weights[pair];
        for (int d = 0; d < D; ++d) y[d] += g * v[d];
      }
      a = b;
    }
    team_barrier();
    for (int u = 0; u < nt; ++u) {
      const float* p = members + static_cast<int64_t>(u) * own + (partial - weights);
      for (int n = 0; n < N; ++n)
        for (int d = lo; d < hi; ++d)
          out[static_cast<int64_t>(n) * D + d] += p[static_cast<int64_t>(n) * D + d];
    }
  }
}

// ------------------------------------------------------------------------------ dense FFN

struct FfnRow {
  int32_t D, H;
  const float* w13;   // (2H, D): [gate; up]
  const float* down;  // (D, H)
};

// N rows of the dense SwiGLU FFN: out = down · (silu(gate · x) ⊙ up · x). A team splits
// the hidden units (their gate and up rows, read once for all N rows), then the outputs.
void ffn_rows(const FfnRow* f, const float* x, int32_t N, float* out) {
  const int D = f->D, H = f->H;
  [[maybe_unused]] const int T = team_size();
  float* act = scratch(static_cast<size_t>(N) * 3 * H);  // (N, H), then gate and up (N, H)
  float* gate = act + static_cast<int64_t>(N) * H;
  float* up = gate + static_cast<int64_t>(N) * H;
#ifdef _OPENMP
#pragma omp parallel num_threads(T) if (T > 1)
#endif
  {
    const int t = team_rank(), nt = team_count();
    int lo, hi;
    share(H, t, nt, 16, lo, hi);
    gemm_nk(x, D, N, f->w13 + static_cast<int64_t>(lo) * D, hi - lo, D, 1.0f, gate + lo, H,
            false);
    gemm_nk(x, D, N, f->w13 + static_cast<int64_t>(H + lo) * D, hi - lo, D, 1.0f, up + lo, H,
            false);
    for (int n = 0; n < N; ++n) {
      const int64_t at = static_cast<int64_t>(n) * H + lo;
      swiglu(gate + at, up + at, hi - lo, act + at);
    }
    team_barrier();
    share(D, t, nt, 16, lo, hi);
    gemm_nk(act, H, N, f->down + static_cast<int64_t>(lo) * H, hi - lo, H, 1.0f, out + lo, D,
            false);
  }
}

// ------------------------------------------------------------------------------ loop step

struct LoopRow {
  int32_t D, r;
  float eps, threshold;
  const float* lora_B;  // (r, D)
  const float* A;       // (D,)
  const float* inj_B;   // (D,)
  const float* halt_w;  // (D,)
  const float* halt_b;  // (1,)
  const float* norm_w;  // (D,)
};

// The loop epilogue of one row, in the reference's order: LoRA (lora_down (r, D) is this
// loop index's down-projection, its scale folded in), then
// h = (block_out + lora) + A·h + B·e, the ACT update (in float32, halted == cum_p ≥
// threshold), and, when next_emb is given, the next prologue
// rmsnorm(h + next_emb + e)·norm_w into next_combined (which may alias block_out).
// Returns whether the row halted at this step.
static bool epilogue_one(const LoopRow* p, const float* lora_down, const float* block_out,
                         float* h, const float* e, float* cum_p, bool* halted, float* h_out,
                         const float* next_emb, float* next_combined) {
  const int D = p->D;
  float* mixed = scratch(D + p->r);  // block_out + LoRA delta, then z
  float* z = mixed + D;
  gemv_nk(block_out, lora_down, p->r, D, 1.0f, z, false);
  std::memcpy(mixed, block_out, sizeof(float) * D);
  gemv_kn(z, p->lora_B, p->r, D, D, mixed, true);
  for (int d = 0; d < D; ++d) h[d] = (mixed[d] + p->A[d] * h[d]) + p->inj_B[d] * e[d];
  const float logit = p->halt_b[0] + dot(h, p->halt_w, D);
  const float prob = 1.0f / (1.0f + std::exp(-logit));
  const float cum = *cum_p;
  bool crossing = false;
  if (!(cum >= p->threshold)) {
    const float total = cum + prob;
    crossing = total >= p->threshold;
    const float weight = crossing ? (1.0f - cum > 0.f ? 1.0f - cum : 0.f) : prob;
    if (weight != 0.f)
      for (int d = 0; d < D; ++d) h_out[d] += weight * h[d];
    *cum_p = total;
    if (crossing) *halted = true;
  }
  if (next_emb != nullptr) {
    for (int d = 0; d < D; ++d) next_combined[d] = (h[d] + next_emb[d]) + e[d];
    const float r = inv_rms(next_combined, D, p->eps);
    for (int d = 0; d < D; ++d) next_combined[d] = r * next_combined[d] * p->norm_w[d];
  }
  return crossing;
}

// The epilogue of N rows (the ACT state's first N), n_running lowered by the rows that
// halt; next_emb/next_combined as for one row (null: no next prologue).
void loop_epilogue_rows(const LoopRow* p, const float* lora_down, const float* block_out,
                        float* h, const float* e, int32_t N, float* cum_p, bool* halted,
                        float* h_out, int32_t* n_running, const float* next_emb,
                        float* next_combined) {
  const int64_t D = p->D;
  int crossed = 0;
  [[maybe_unused]] const int T = team_size();
#ifdef _OPENMP
#pragma omp parallel for num_threads(T) if (T > 1 && N >= 16) reduction(+ : crossed)
#endif
  for (int n = 0; n < N; ++n)
    crossed += epilogue_one(p, lora_down, block_out + n * D, h + n * D, e + n * D, cum_p + n,
                            halted + n, h_out + n * D, next_emb,
                            next_emb != nullptr ? next_combined + n * D : nullptr);
  *n_running -= crossed;
}

}  // extern "C"
