// Row kernels of mythos-rt's cpu backend (decode steps, and prefill's norms and loop
// epilogues), float32; the matrix kernels (MLA, GQA, MoE, dense FFN, head) also over
// bf16 weights and caches (*_bf16), widened to float32 in registers: every sum is float32.
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

#include "row_math.h"

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

// The widest vector registers this build uses: 512 (AVX-512), 256 (AVX2) or 128.
int32_t vector_bits() {
#if defined(__AVX512F__)
  return 512;
#elif defined(__AVX2__)
  return 256;
#else
  return 128;
#endif
}

// Σ x[i] for i < n, the team splitting x into contiguous stretches and each member
// reading its stretch as four streams at once (a quarter each), as the matrix products
// read four weight rows at once: a single stream per core reaches less of the memory
// bandwidth on the machines measured (an AVX2 EPYC: about two thirds). The pass over
// memory at the speed the kernels' weight streams could reach: the benchmark's read floor.
float stream_sum(const float* x, int64_t n) {
  const int T = team_size();
  float total = 0.f;
#ifdef _OPENMP
#pragma omp parallel num_threads(T) if (T > 1) reduction(+ : total)
#endif
  {
    constexpr int streams = 4, step = 64 / streams;  // floats per stream per step
    const int64_t blocks = n / 64, t = team_rank(), nt = team_count();
    const int64_t lo = blocks * t / nt * 64, hi = blocks * (t + 1) / nt * 64;
    const int64_t quarter = (hi - lo) / streams;  // a multiple of step: hi - lo is of 64
    vpart acc[streams][step / kPart] = {};  // register-width sums: see tile_sums
    for (int64_t i = 0; i < quarter; i += step)
      for (int q = 0; q < streams; ++q)
        for (int j = 0; j < step / kPart; ++j)
          acc[q][j] += load_part(x + lo + q * quarter + i + kPart * j);
    vpart sum = {};
    for (int q = 0; q < streams; ++q)
      for (int j = 0; j < step / kPart; ++j) sum += acc[q][j];
    for (int l = 0; l < kPart; ++l) total += sum[l];
    if (t == nt - 1)
      for (int64_t i = blocks * 64; i < n; ++i) total += x[i];
  }
  return total;
}

// The threads a kernel would use now.
int32_t team_threads() { return team_size(); }

// ------------------------------------------------------------------------------ RMSNorm

}  // extern "C"

namespace {

// Per row of N: s = x (+ residual), stored into residual_out when given (rounded to the
// rows' type, and normalized from that stored value); out = s · rsqrt(mean(s²) + eps) · w,
// summed in float32. out and residual_out may alias x or residual. S: float or bf16.
template <class S>
void rmsnorm_rows_of(const S* x, const S* residual, const float* w, float eps, int32_t N,
                     int32_t D, S* out, S* residual_out) {
  [[maybe_unused]] const int T = team_size();
#ifdef _OPENMP
#pragma omp parallel for num_threads(T) if (T > 1 && N >= 16)
#endif
  for (int n = 0; n < N; ++n) {
    const int64_t at = static_cast<int64_t>(n) * D;
    float* s = scratch(D);
    for (int d = 0; d < D; ++d) {
      if (residual != nullptr) {
        put(residual_out[at + d], to_float(x[at + d]) + to_float(residual[at + d]));
        s[d] = to_float(residual_out[at + d]);
      } else {
        s[d] = to_float(x[at + d]);
      }
    }
    const float r = inv_rms(s, D, eps);
    for (int d = 0; d < D; ++d) put(out[at + d], r * s[d] * w[d]);
  }
}

}  // namespace

extern "C" {

void rmsnorm_rows(const float* x, const float* residual, const float* w, float eps, int32_t N,
                  int32_t D, float* out, float* residual_out) {
  rmsnorm_rows_of(x, residual, w, eps, N, D, out, residual_out);
}

void rmsnorm_rows_bf16(const bf16* x, const bf16* residual, const float* w, float eps,
                       int32_t N, int32_t D, bf16* out, bf16* residual_out) {
  rmsnorm_rows_of(x, residual, w, eps, N, D, out, residual_out);
}

// ------------------------------------------------------------------------------ MLA

// Every matrix in nn.Linear's (out, in) layout, streamed row by row (gemm_nk); float32
// (mla_decode_rows) or bf16 (mla_decode_rows_bf16, over a bf16 cache). kv_norm is float32.
struct MlaRow {
  int32_t D, H, R, P, q_lora, nope, v;
  float eps;
  const void* down;      // (P + R + q_lora, D): x -> [k_pe | latent | c_q]
  const float* kv_norm;  // (R,)
  const void* q_up;      // (H·(P + Q), q_lora): c_q -> per head [q_pe | q_Q], scaled, where
                         // Q = R (w_uk absorbed: q_latent) or nope (w_uk given: q_nope)
  const void* w_uk;      // (H, R, nope): q_latent[h] = w_uk[h] · q_nope[h], or null (absorbed)
  const void* w_uv;      // (H, v, R): o_v[h] = w_uv[h] · o_latent[h], or null (absorbed)
  const void* wo;        // (D, H·R) absorbed output projection, or wo (D, H·v)
};

}  // extern "C"

namespace {

// B rows of one new token of MLA, row b over its own joint cache rows
// (cache + b·batch_stride: (S_max, P + R) = [k_pe | latent]) at position cache_lens[b]
// (read here, so a prebound call stays valid as the caches grow): project, normalize,
// rotate, store the new entries, attend, project out. The projections are one product
// over all B rows (the weights cross memory once, front to back); a team splits them by
// output rows, the new entries by rows and the attention by heads. Returns 1, having
// touched nothing, when a position is outside the cache; else 0. Mat: the matrices' and
// the cache's type.
template <class Mat>
int32_t mla_decode_rows_of(const MlaRow* m, const float* x, Mat* cache, int64_t batch_stride,
                           const int32_t* cache_lens, int32_t B, int32_t S_max,
                           const float* cos, const float* sin, float* out) {
  const Mat* down = static_cast<const Mat*>(m->down);
  const Mat* q_up_w = static_cast<const Mat*>(m->q_up);
  const Mat* w_uk = static_cast<const Mat*>(m->w_uk);
  const Mat* w_uv = static_cast<const Mat*>(m->w_uv);
  const Mat* wo = static_cast<const Mat*>(m->wo);
  int L_max = 0;
  for (int b = 0; b < B; ++b) {
    if (cache_lens[b] < 0 || cache_lens[b] >= S_max) return 1;
    L_max = std::max(L_max, cache_lens[b] + 1);
  }
  const int W = m->P + m->R, H = m->H, R = m->R, P = m->P, half = P / 2, D = m->D;
  const int Wq = w_uk != nullptr ? P + m->nope : W;  // q_up's rows per head
  const int Vo = w_uv != nullptr ? m->v : R;         // wo's columns per head
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
    share(down_n, t, nt, 4, lo, hi);  // entries [k_pe | latent | c_q] of every row
    gemm_nk(x, D, B, down + static_cast<int64_t>(lo) * D, hi - lo, D, 1.0f, entry + lo, down_n,
            false);
    team_barrier();
    int h0, h1;
    share(H, t, nt, 1, h0, h1);
    // This member's heads of every row's query: the up-projection (then w_uk, if given)
    // as one product over all B rows, so each weight is read once, not once per row.
    gemm_nk(entry + W, down_n, B, q_up_w + static_cast<int64_t>(h0) * Wq * m->q_lora,
            (h1 - h0) * Wq, m->q_lora, 1.0f, q_up + h0 * Wq, H * Wq, false);
    if (w_uk != nullptr)  // q_latent = w_uk[h] · q_nope (r_q applied below)
      for (int h = h0; h < h1; ++h)
        gemm_nk(q_up + h * Wq + P, H * Wq, B, w_uk + static_cast<int64_t>(h) * R * m->nope, R,
                m->nope, 1.0f, q + h * W + P, H * W, false);
    for (int b = 0; b < B; ++b) {
      const float r_q = inv_rms(entry + static_cast<int64_t>(b) * down_n + W, m->q_lora, m->eps);
      const float* c = cos + static_cast<int64_t>(cache_lens[b]) * half;
      const float* s = sin + static_cast<int64_t>(cache_lens[b]) * half;
      for (int h = h0; h < h1; ++h) {
        const float* u = q_up + (static_cast<int64_t>(b) * H + h) * Wq;
        float* qh = q + (static_cast<int64_t>(b) * H + h) * W;
        for (int i = 0; i < P; ++i) qh[i] = r_q * u[i];
        if (w_uk != nullptr)
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
      store_row(cache + b * batch_stride + static_cast<int64_t>(pos) * W, e, W);
    }
    team_barrier();  // every entry is in its slot
    for (int b = 0; b < B; ++b) {
      const Mat* rows = cache + b * batch_stride;  // keys [k_pe | latent], values latent
      attend(q + static_cast<int64_t>(b) * H * W + h0 * W, h1 - h0, rows, W, rows + P, R, W,
             cache_lens[b] + 1, scores + h0 * L_max, o + static_cast<int64_t>(b) * H * R + h0 * R);
    }
    if (w_uv != nullptr)  // o_v[h] = w_uv[h] · o_latent[h], over all rows at once
      for (int h = h0; h < h1; ++h)
        gemm_nk(o + h * R, H * R, B, w_uv + static_cast<int64_t>(h) * Vo * R, Vo, R, 1.0f,
                o_v + h * Vo, H * Vo, false);
    team_barrier();
    share(D, t, nt, 4, lo, hi);
    gemm_nk(w_uv != nullptr ? o_v : o, H * Vo, B, wo + static_cast<int64_t>(lo) * H * Vo,
            hi - lo, H * Vo, 1.0f, out + lo, D, false);
  }
  return 0;
}

}  // namespace

extern "C" {

int32_t mla_decode_rows(const MlaRow* m, const float* x, float* cache, int64_t batch_stride,
                        const int32_t* cache_lens, int32_t B, int32_t S_max, const float* cos,
                        const float* sin, float* out) {
  return mla_decode_rows_of<float>(m, x, cache, batch_stride, cache_lens, B, S_max, cos, sin,
                                   out);
}

int32_t mla_decode_rows_bf16(const MlaRow* m, const float* x, bf16* cache, int64_t batch_stride,
                             const int32_t* cache_lens, int32_t B, int32_t S_max,
                             const float* cos, const float* sin, float* out) {
  return mla_decode_rows_of<bf16>(m, x, cache, batch_stride, cache_lens, B, S_max, cos, sin,
                                  out);
}

// ------------------------------------------------------------------------------ GQA

// The matrices in nn.Linear's (out, in) layout, streamed row by row (gemm_nk); float32
// (gqa_decode_rows) or bf16 (gqa_decode_rows_bf16, over bf16 caches).
struct GqaRow {
  int32_t D, H, Hkv, d;
  const void* qkv;  // ((H + 2·Hkv)·d, D): x -> [q · softmax scale | k | v]
  const void* wo;   // (D, H·d)
};

}  // extern "C"

namespace {

// B rows of one new token of GQA, row b over its own caches (k_cache / v_cache +
// b·batch_stride: (S_max, Hkv, d), keys stored after RoPE) at position cache_lens[b]
// (read here, so a prebound call stays valid as the caches grow): project, rotate q and
// k, store the new k and v, attend (query head h reads kv head h / (H / Hkv)), project
// out. The projections are one product over all B rows; a team splits them by columns,
// the new entries by rows and the attention by (row, kv head). Returns 1, having touched
// nothing, when a position is outside the cache; else 0. W: the matrices' type (and the
// caches').
template <class W>
int32_t gqa_decode_rows_of(const GqaRow* m, const float* x, W* k_cache, W* v_cache,
                           int64_t batch_stride, const int32_t* cache_lens, int32_t B,
                           int32_t S_max, const float* cos, const float* sin, float* out) {
  const W* qkv = static_cast<const W*>(m->qkv);
  const W* wo = static_cast<const W*>(m->wo);
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
    share(Wy, t, nt, 4, lo, hi);  // [q | k | v] of every row
    gemm_nk(x, D, B, qkv + static_cast<int64_t>(lo) * D, hi - lo, D, 1.0f, y + lo, Wy, false);
    team_barrier();
    share(B, t, nt, 1, lo, hi);
    for (int b = lo; b < hi; ++b) {  // this member's rows: rotate q and k, store k and v
      float* yb = y + static_cast<int64_t>(b) * Wy;
      const int pos = cache_lens[b];
      const float* c = cos + static_cast<int64_t>(pos) * half;
      const float* s = sin + static_cast<int64_t>(pos) * half;
      for (int h = 0; h < H + Hkv; ++h) rotate(yb + h * d, c, s, half);
      const int64_t slot = b * batch_stride + static_cast<int64_t>(pos) * Wkv;
      store_row(k_cache + slot, yb + H * d, Wkv);
      store_row(v_cache + slot, yb + H * d + Wkv, Wkv);
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
    share(D, t, nt, 4, lo, hi);
    gemm_nk(o, H * d, B, wo + static_cast<int64_t>(lo) * H * d, hi - lo, H * d, 1.0f, out + lo,
            D, false);
  }
  return 0;
}

}  // namespace

extern "C" {

int32_t gqa_decode_rows(const GqaRow* m, const float* x, float* k_cache, float* v_cache,
                        int64_t batch_stride, const int32_t* cache_lens, int32_t B,
                        int32_t S_max, const float* cos, const float* sin, float* out) {
  return gqa_decode_rows_of<float>(m, x, k_cache, v_cache, batch_stride, cache_lens, B, S_max,
                                   cos, sin, out);
}

int32_t gqa_decode_rows_bf16(const GqaRow* m, const float* x, bf16* k_cache, bf16* v_cache,
                             int64_t batch_stride, const int32_t* cache_lens, int32_t B,
                             int32_t S_max, const float* cos, const float* sin, float* out) {
  return gqa_decode_rows_of<bf16>(m, x, k_cache, v_cache, batch_stride, cache_lens, B, S_max,
                                  cos, sin, out);
}

// ------------------------------------------------------------------------------ MoE

// The matrices are float32 (moe_rows) or bf16 (moe_rows_bf16); the biases float32.
// An expert-parallel shard (mythos_rt.parallel) holds the routed experts start ..
// start + L - 1 of the E the router scores, and S shared slots: it adds only theirs.
struct MoeRow {
  int32_t D, E, S, I, k, L, start;
  const void* router;        // (E, D)
  const float* front_bias;   // (S·2I + E,) = [0 | router bias]
  const float* router_bias;  // (E,)
  const void* w13;           // (L + S, 2I, D): per held expert [gate; up], the shared slots last
  const void* w2;            // (L + S, D, I): per held expert down, the shared slots last
};

}  // extern "C"

namespace {

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

// N tokens: the "front" [shared slots' gate/up | router logits] (one product over all N,
// its rows read in place from w13's shared slots and the router), the shared experts'
// down (one product per slot, summed), then Σ weight_j · down_j(silu(gate_j x) · up_j x)
// added on per token. The (token, expert) pairs are sorted by expert, so each run of one
// expert's tokens is one product over its weights (read once for the run, not once per
// token).
// Every product streams its weights in nn.Linear's (out, in) layout. A team splits the
// products by output rows (each member streams its own contiguous stretch of the
// matrix), the shared activations by tokens and the sorted
// pairs into equal contiguous shares (each member routes and sorts every token itself:
// the same answer, no wait), and sums the members' expert outputs at the end.
template <class W>
void moe_rows_of(const MoeRow* m, const float* x, int32_t N, float* out) {
  const W* router = static_cast<const W*>(m->router);
  const W* w13 = static_cast<const W*>(m->w13);
  const W* w2 = static_cast<const W*>(m->w2);
  const int D = m->D, E = m->E, S = m->S, I = m->I, k = m->k, shared = S * 2 * I;
  const int L = m->L, start = m->start;
  const W* shared_w13 = w13 + static_cast<int64_t>(L) * 2 * I * D;  // (S·2I, D)
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
    share(F, t, nt, 4, lo, hi);  // each member streams its own rows of the front
    for (int n = 0; n < N; ++n)
      std::memcpy(front + static_cast<int64_t>(n) * F + lo, m->front_bias + lo,
                  sizeof(float) * (hi - lo));
    const int split = std::min(std::max(shared, lo), hi);  // [lo, split) shared, then router
    if (lo < split)
      gemm_nk(x, D, N, shared_w13 + static_cast<int64_t>(lo) * D, split - lo, D, 1.0f,
              front + lo, F, true);
    if (split < hi)
      gemm_nk(x, D, N, router + static_cast<int64_t>(split - shared) * D, hi - split, D, 1.0f,
              front + split, F, true);
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
    share(D, t, nt, 4, lo, hi);
    for (int s = 0; s < S; ++s)  // slot s's down rows [lo, hi): one contiguous stretch
      gemm_nk(shared_act + static_cast<int64_t>(s) * I, S * I, N,
              w2 + (static_cast<int64_t>(L + s) * D + lo) * I, hi - lo, I, 1.0f, out + lo, D,
              s > 0);
    if (S == 0)
      for (int n = 0; n < N; ++n)
        std::memset(out + static_cast<int64_t>(n) * D + lo, 0, sizeof(float) * (hi - lo));
    std::memset(partial, 0, sizeof(float) * N * D);
    int p0, p1;
    share(N * k, t, nt, 1, p0, p1);
    for (int a = p0; a < p1;) {  // this member's sorted pairs, one expert's run at a time
      const int64_t e = chosen[order[a]] - start;  // the held expert's index
      int b = a;
      while (b < p1 && chosen[order[b]] == e + start) ++b;
      const int M = b - a;
      if (e < 0 || e >= L) {  // another shard's expert
        a = b;
        continue;
      }
      for (int r = 0; r < M; ++r)
        std::memcpy(rows + static_cast<int64_t>(r) * D,
                    x + static_cast<int64_t>(order[a + r] / k) * D, sizeof(float) * D);
      gemm_nk(rows, D, M, w13 + e * 2 * I * D, 2 * I, D, 1.0f, gate_up, 2 * I, false);
      for (int r = 0; r < M; ++r)
        swiglu(gate_up + static_cast<int64_t>(r) * 2 * I,
               gate_up + static_cast<int64_t>(r) * 2 * I + I, I, act + static_cast<int64_t>(r) * I);
      gemm_nk(act, I, M, w2 + e * D * I, D, I, 1.0f, down, D, false);
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

}  // namespace

extern "C" {

void moe_rows(const MoeRow* m, const float* x, int32_t N, float* out) {
  moe_rows_of<float>(m, x, N, out);
}

void moe_rows_bf16(const MoeRow* m, const float* x, int32_t N, float* out) {
  moe_rows_of<bf16>(m, x, N, out);
}

// ------------------------------------------------------------------------------ dense FFN

// The matrices are float32 (ffn_rows) or bf16 (ffn_rows_bf16).
struct FfnRow {
  int32_t D, H;
  const void* w13;   // (2H, D): [gate; up]
  const void* down;  // (D, H)
};

}  // extern "C"

namespace {

// N rows of the dense SwiGLU FFN: out = down · (silu(gate · x) ⊙ up · x). A team splits
// the hidden units (their gate and up rows, read once for all N rows), then the outputs.
template <class W>
void ffn_rows_of(const FfnRow* f, const float* x, int32_t N, float* out) {
  const W* w13 = static_cast<const W*>(f->w13);
  const W* down = static_cast<const W*>(f->down);
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
    gemm_nk(x, D, N, w13 + static_cast<int64_t>(lo) * D, hi - lo, D, 1.0f, gate + lo, H, false);
    gemm_nk(x, D, N, w13 + static_cast<int64_t>(H + lo) * D, hi - lo, D, 1.0f, up + lo, H,
            false);
    for (int n = 0; n < N; ++n) {
      const int64_t at = static_cast<int64_t>(n) * H + lo;
      swiglu(gate + at, up + at, hi - lo, act + at);
    }
    team_barrier();
    share(D, t, nt, 16, lo, hi);
    gemm_nk(act, H, N, down + static_cast<int64_t>(lo) * H, hi - lo, H, 1.0f, out + lo, D,
            false);
  }
}

}  // namespace

extern "C" {

void ffn_rows(const FfnRow* f, const float* x, int32_t N, float* out) {
  ffn_rows_of<float>(f, x, N, out);
}

void ffn_rows_bf16(const FfnRow* f, const float* x, int32_t N, float* out) {
  ffn_rows_of<bf16>(f, x, N, out);
}

// ------------------------------------------------------------------------------ head

// The matrix is float32 (head_rows) or bf16 (head_rows_bf16).
struct HeadRow {
  int32_t V, D;
  const void* w;  // (V, D): the vocabulary projection, nn.Linear's layout
};

}  // extern "C"

namespace {

// logits (N, V) = x (N, D) · wᵀ: the team splits the vocabulary rows, each member
// streaming its own stretch of w once for all N rows.
template <class W>
void head_rows_of(const HeadRow* h, const float* x, int32_t N, float* logits) {
  const W* w = static_cast<const W*>(h->w);
  const int V = h->V, D = h->D;
  [[maybe_unused]] const int T = team_size();
#ifdef _OPENMP
#pragma omp parallel num_threads(T) if (T > 1)
#endif
  {
    int lo, hi;
    share(V, team_rank(), team_count(), 4, lo, hi);
    gemm_nk(x, D, N, w + static_cast<int64_t>(lo) * D, hi - lo, D, 1.0f, logits + lo, V, false);
  }
}

}  // namespace

extern "C" {

void head_rows(const HeadRow* h, const float* x, int32_t N, float* logits) {
  head_rows_of<float>(h, x, N, logits);
}

void head_rows_bf16(const HeadRow* h, const float* x, int32_t N, float* logits) {
  head_rows_of<bf16>(h, x, N, logits);
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

}  // extern "C"

namespace {

// The loop epilogue of one row, in the reference's order: LoRA (lora_down (r, D) is this
// loop index's down-projection, its scale folded in), then
// h = (block_out + lora) + A·h + B·e, the ACT update (in float32, halted == cum_p ≥
// threshold), and, when next_emb is given, the next prologue
// rmsnorm(h + next_emb + e)·norm_w into next_combined (which may alias block_out). Rows of
// type S (float or bf16), every sum in float32: h is rounded to S once, and that stored
// value is what the ACT update and the next prologue read (as torch's implementations).
// Returns whether the row halted at this step.
template <class S>
bool epilogue_one(const LoopRow* p, const float* lora_down, const S* block_out, S* h,
                  const S* e, float* cum_p, bool* halted, S* h_out, const float* next_emb,
                  S* next_combined) {
  const int D = p->D;
  float* mixed = scratch(3 * static_cast<size_t>(D) + p->r);  // block_out + LoRA delta
  float* hs = mixed + D;                                      // the stored h
  float* ef = hs + D;
  float* z = ef + D;
  for (int d = 0; d < D; ++d) {
    mixed[d] = to_float(block_out[d]);
    ef[d] = to_float(e[d]);
  }
  gemv_nk(mixed, lora_down, p->r, D, 1.0f, z, false);
  gemv_kn(z, p->lora_B, p->r, D, D, mixed, true);
  for (int d = 0; d < D; ++d) {
    put(h[d], (mixed[d] + p->A[d] * to_float(h[d])) + p->inj_B[d] * ef[d]);
    hs[d] = to_float(h[d]);
  }
  const float logit = p->halt_b[0] + dot(hs, p->halt_w, D);
  const float prob = 1.0f / (1.0f + std::exp(-logit));
  const float cum = *cum_p;
  bool crossing = false;
  if (!(cum >= p->threshold)) {
    const float total = cum + prob;
    crossing = total >= p->threshold;
    const float weight = crossing ? (1.0f - cum > 0.f ? 1.0f - cum : 0.f) : prob;
    if (weight != 0.f)
      for (int d = 0; d < D; ++d) put(h_out[d], to_float(h_out[d]) + weight * hs[d]);
    *cum_p = total;
    if (crossing) *halted = true;
  }
  if (next_emb != nullptr) {  // mixed is free again: the prologue's sum
    for (int d = 0; d < D; ++d) mixed[d] = (hs[d] + next_emb[d]) + ef[d];
    const float r = inv_rms(mixed, D, p->eps);
    for (int d = 0; d < D; ++d) put(next_combined[d], r * mixed[d] * p->norm_w[d]);
  }
  return crossing;
}

// The epilogue of N rows (the ACT state's first N), n_running lowered by the rows that
// halt; next_emb/next_combined as for one row (null: no next prologue).
template <class S>
void epilogue_rows_of(const LoopRow* p, const float* lora_down, const S* block_out, S* h,
                      const S* e, int32_t N, float* cum_p, bool* halted, S* h_out,
                      int32_t* n_running, const float* next_emb, S* next_combined) {
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

}  // namespace

extern "C" {

void loop_epilogue_rows(const LoopRow* p, const float* lora_down, const float* block_out,
                        float* h, const float* e, int32_t N, float* cum_p, bool* halted,
                        float* h_out, int32_t* n_running, const float* next_emb,
                        float* next_combined) {
  epilogue_rows_of(p, lora_down, block_out, h, e, N, cum_p, halted, h_out, n_running,
                   next_emb, next_combined);
}

void loop_epilogue_rows_bf16(const LoopRow* p, const float* lora_down, const bf16* block_out,
                             bf16* h, const bf16* e, int32_t N, float* cum_p, bool* halted,
                             bf16* h_out, int32_t* n_running, const float* next_emb,
                             bf16* next_combined) {
  epilogue_rows_of(p, lora_down, block_out, h, e, N, cum_p, halted, h_out, n_running,
                   next_emb, next_combined);
}

}  // extern "C"
