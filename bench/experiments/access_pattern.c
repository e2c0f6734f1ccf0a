// The memory access pattern of one optimizer step with trivial arithmetic: torch's fused Adam
// against fadam_fused's CPU kernel (csrc/cpu/fadam_cpu.cpp), on one list of float32 tensors.
// It answers "how much of fadam-cpu's time over Adam's is the order in which the step touches
// memory, whatever the arithmetic", on the machine it runs on. access_pattern.py (beside it)
// builds and runs it on the default CPU workload.
//
//   access_pattern THREADS ROUNDS CHUNK NUMEL...
//
// Both steps run as (tensor, chunk) items taken heaviest first by THREADS OpenMP threads, as the
// kernel's for_each_item does. Per element:
//   adam                      read g, theta, m, v; write theta, m, v
//   fadam, tensor > CHUNK     phase A: read g, f, theta (per chunk)
//                             phase B: read g, f, theta, m; write f, m, theta (per chunk)
//   fadam, tensor <= CHUNK    phase A: read g (the non-finite check, as four quarters)
//                             phase B, one item: read g, f, theta; write f and r (a per-thread
//                             scratch), then read g, theta, r, m; write m, theta
// Two more steps, for comparison:
//   no check    FAdam's without the gradient check of the one-chunk tensors (what the pattern
//               would cost if the non-finite skip, docs/design.md section 6, did not need it);
//   two-pass    the plain two-phase design, every tensor as a multi-chunk one (40 B per
//               parameter, docs/design.md section 4): the step the "about 1.43x" expectation
//               counts.
// Output, one line: adam_ms fadam_ms phase_a_ms ratio ratio_p20 ratio_p80 ratio_no_check
// ratio_two_pass adam_B fadam_B, where the ms are medians over rounds, the ratios are medians
// over rounds of the ratio within a round (the steps run back to back, in an order rotated every
// round), and *_B are the DRAM bytes per parameter the passes must move (bench/traffic.py's
// model: pass two's re-reads from cache not counted).
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum Kind { ADAM, REDUCE, CHECK, UPDATE, FUSED };

typedef struct {
  int tensor;
  int64_t begin, end;
  int kind;
  int64_t cost;  // bytes: the scheduling weight
} Item;

typedef struct {
  Item* items;
  int64_t n;
} Phase;

static int64_t n_tensors, chunk, *numel;
static float **g, **theta, **f, **m, **adam_theta, **adam_m, **adam_v;
// Every pass adds its sums here, so no loop is dead code to the compiler.
volatile double sink[256];

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static float* alloc_random(int64_t n, float scale, uint64_t* state) {
  float* p = aligned_alloc(64, ((n * 4 + 63) / 64) * 64 + 64);
  for (int64_t i = 0; i < n; ++i) {  // xorshift64: distinct pages, no zero page sharing
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    p[i] = scale * (1.0f + (float)(*state >> 40) * 0x1p-24f);
  }
  return p;
}

static double adam_pass(float* restrict gp, float* restrict tp, float* restrict mp,
                        float* restrict vp, int64_t b, int64_t e) {
  for (int64_t i = b; i < e; ++i) {
    const float gi = gp[i];
    const float mi = 0.9f * mp[i] + 0.1f * gi;
    const float vi = 0.999f * vp[i] + 0.001f * gi * gi;
    mp[i] = mi;
    vp[i] = vi;
    tp[i] -= 1e-3f * mi * vi;
  }
  return 0.0;
}

// read g, f, theta: the sums of phase A
static double reduce_pass(const float* restrict gp, const float* restrict fp,
                          const float* restrict tp, int64_t b, int64_t e) {
  float s = 0.f;
  for (int64_t i = b; i < e; ++i) {
    const float fi = 0.999f * fp[i] + 0.001f * gp[i] * gp[i];
    s += gp[i] * fi + tp[i] * fi;
  }
  return s;
}

// read g as four quarters side by side, as check_chunk does
static double check_pass(const float* restrict gp, int64_t b, int64_t e) {
  const int64_t q = (e - b) / 4;
  float s = 0.f;
  for (int64_t i = b; i < b + q; ++i) {
    s += gp[i] + gp[i + q] + gp[i + 2 * q] + gp[i + 3 * q];
  }
  for (int64_t i = b + 4 * q; i < e; ++i) {
    s += gp[i];
  }
  return s;
}

// read g, f, theta, m; write f, m, theta: phase B of a multi-chunk tensor
static double update_pass(const float* restrict gp, float* restrict fp, float* restrict tp,
                          float* restrict mp, int64_t b, int64_t e) {
  for (int64_t i = b; i < e; ++i) {
    const float fi = 0.999f * fp[i] + 0.001f * gp[i] * gp[i];
    const float mi = 0.9f * mp[i] + 0.1f * gp[i] * fi;
    fp[i] = fi;
    mp[i] = mi;
    tp[i] -= 1e-3f * (mi + tp[i] * fi);
  }
  return 0.0;
}

// phase B of a one-chunk tensor: a reduction that keeps f and r, then the update from cache
static double fused_pass(const float* restrict gp, float* restrict fp, float* restrict tp,
                         float* restrict mp, float* restrict r, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    const float fi = 0.999f * fp[i] + 0.001f * gp[i] * gp[i];
    const float ri = 1e-3f * fi;
    fp[i] = fi;
    r[i] = ri;
    s += gp[i] * ri + tp[i] * ri;
  }
  const float scale = 1.0f + s * 1e-30f;
  for (int64_t i = 0; i < n; ++i) {
    const float mi = 0.9f * mp[i] + scale * gp[i] * r[i];
    mp[i] = mi;
    tp[i] -= 1e-3f * (mi + tp[i] * r[i]);
  }
  return s;
}

static void run_phase(const Phase* ph, float** scratch) {
  int64_t next = 0;
#pragma omp parallel
  {
    const int tid = omp_get_thread_num();
    double acc = 0.0;
    for (;;) {
      int64_t k;
#pragma omp atomic capture
      k = next++;
      if (k >= ph->n) break;
      const Item it = ph->items[k];
      const int t = it.tensor;
      switch (it.kind) {
        case ADAM:
          acc += adam_pass(g[t], adam_theta[t], adam_m[t], adam_v[t], it.begin, it.end);
          break;
        case REDUCE:
          acc += reduce_pass(g[t], f[t], theta[t], it.begin, it.end);
          break;
        case CHECK:
          acc += check_pass(g[t], it.begin, it.end);
          break;
        case UPDATE:
          acc += update_pass(g[t], f[t], theta[t], m[t], it.begin, it.end);
          break;
        case FUSED:
          acc += fused_pass(g[t], f[t], theta[t], m[t], scratch[tid], it.end);
          break;
      }
    }
    sink[tid % 256] += acc;
  }
}

static int heavier_first(const void* a, const void* b) {
  const Item *x = a, *y = b;
  if (x->cost != y->cost) return x->cost < y->cost ? 1 : -1;
  return x->tensor != y->tensor ? (x->tensor < y->tensor ? -1 : 1) : (x->begin < y->begin ? -1 : 1);
}

static void push(Phase* ph, int t, int64_t b, int64_t e, int kind, int64_t bytes_per_elem) {
  ph->items[ph->n++] = (Item){t, b, e, kind, (e - b) * bytes_per_elem};
}

static int cmp_double(const void* a, const void* b) {
  const double x = *(const double*)a, y = *(const double*)b;
  return x < y ? -1 : x > y;
}

static double quantile(double* v, int n, double q) {
  qsort(v, n, sizeof(double), cmp_double);
  return v[(int)(q * (n - 1) + 0.5)];
}

int main(int argc, char** argv) {
  if (argc < 5) {
    fprintf(stderr, "usage: %s THREADS ROUNDS CHUNK NUMEL...\n", argv[0]);
    return 2;
  }
  const int threads = atoi(argv[1]), rounds = atoi(argv[2]);
  chunk = atoll(argv[3]);
  n_tensors = argc - 4;
  if (threads < 1 || rounds < 1 || chunk < 1) {
    fprintf(stderr, "THREADS, ROUNDS and CHUNK must be positive\n");
    return 2;
  }
  omp_set_num_threads(threads);
  numel = calloc(n_tensors, sizeof(int64_t));
  float*** arrays[] = {&g, &theta, &f, &m, &adam_theta, &adam_m, &adam_v};
  for (size_t a = 0; a < sizeof(arrays) / sizeof(arrays[0]); ++a) {
    *arrays[a] = calloc(n_tensors, sizeof(float*));
  }
  uint64_t state = 0x9E3779B97F4A7C15ull;
  int64_t total = 0, n_items = 0;
  double adam_bytes = 0.0, fadam_bytes = 0.0;
  for (int64_t t = 0; t < n_tensors; ++t) {
    numel[t] = atoll(argv[4 + t]);
    if (numel[t] < 1) {
      fprintf(stderr, "NUMEL must be positive\n");
      return 2;
    }
    total += numel[t];
    n_items += (numel[t] + chunk - 1) / chunk;
    g[t] = alloc_random(numel[t], 1e-2f, &state);
    theta[t] = alloc_random(numel[t], 2e-2f, &state);
    f[t] = alloc_random(numel[t], 1e-4f, &state);
    m[t] = alloc_random(numel[t], 1e-3f, &state);
    adam_theta[t] = alloc_random(numel[t], 2e-2f, &state);
    adam_m[t] = alloc_random(numel[t], 1e-3f, &state);
    adam_v[t] = alloc_random(numel[t], 1e-4f, &state);
    adam_bytes += 28.0 * numel[t];
    fadam_bytes += (numel[t] <= chunk ? 32.0 : 40.0) * numel[t];
  }
  Phase adam = {calloc(n_items, sizeof(Item)), 0}, phase_a = {calloc(n_items, sizeof(Item)), 0},
        phase_b = {calloc(n_items, sizeof(Item)), 0},
        phase_a_no_check = {calloc(n_items, sizeof(Item)), 0},
        two_pass_a = {calloc(n_items, sizeof(Item)), 0},
        two_pass_b = {calloc(n_items, sizeof(Item)), 0};
  for (int64_t t = 0; t < n_tensors; ++t) {
    for (int64_t b = 0; b < numel[t]; b += chunk) {
      const int64_t e = b + chunk < numel[t] ? b + chunk : numel[t];
      push(&adam, t, b, e, ADAM, 28);
      push(&two_pass_a, t, b, e, REDUCE, 12);
      push(&two_pass_b, t, b, e, UPDATE, 28);
      if (numel[t] > chunk) {
        push(&phase_a, t, b, e, REDUCE, 12);
        push(&phase_a_no_check, t, b, e, REDUCE, 12);
        push(&phase_b, t, b, e, UPDATE, 28);
      } else {
        push(&phase_a, t, b, e, CHECK, 4);
        push(&phase_b, t, b, e, FUSED, 44);
      }
    }
  }
  qsort(adam.items, adam.n, sizeof(Item), heavier_first);
  qsort(phase_a.items, phase_a.n, sizeof(Item), heavier_first);
  qsort(phase_b.items, phase_b.n, sizeof(Item), heavier_first);
  qsort(phase_a_no_check.items, phase_a_no_check.n, sizeof(Item), heavier_first);
  qsort(two_pass_a.items, two_pass_a.n, sizeof(Item), heavier_first);
  qsort(two_pass_b.items, two_pass_b.n, sizeof(Item), heavier_first);
  float** scratch = calloc(threads, sizeof(float*));
  for (int k = 0; k < threads; ++k) {
    scratch[k] = alloc_random(chunk, 1.0f, &state);
  }

  double *t_adam = calloc(rounds, sizeof(double)), *t_fadam = calloc(rounds, sizeof(double)),
         *t_a = calloc(rounds, sizeof(double)), *ratio = calloc(rounds, sizeof(double)),
         *ratio_no_check = calloc(rounds, sizeof(double)),
         *ratio_two_pass = calloc(rounds, sizeof(double));
  for (int r = -2; r < rounds; ++r) {  // two warmup rounds: first touch, thread pool
    // steps: 0 adam, 1 fadam, 2 fadam without the check, 3 two-pass
    double t[4] = {0.0, 0.0, 0.0, 0.0}, tpa = 0.0;
    for (int k = 0; k < 4; ++k) {
      const int step = (k + (r + 4) % 4) % 4;  // rotated: each step leads every fourth round
      const double s = now();
      if (step == 0) {
        run_phase(&adam, scratch);
      } else if (step == 3) {
        run_phase(&two_pass_a, scratch);
        run_phase(&two_pass_b, scratch);
      } else {
        run_phase(step == 1 ? &phase_a : &phase_a_no_check, scratch);
        if (step == 1) tpa = now() - s;
        run_phase(&phase_b, scratch);
      }
      t[step] = now() - s;
    }
    if (r >= 0) {
      t_adam[r] = t[0];
      t_fadam[r] = t[1];
      t_a[r] = tpa;
      ratio[r] = t[1] / t[0];
      ratio_no_check[r] = t[2] / t[0];
      ratio_two_pass[r] = t[3] / t[0];
    }
  }
  const double r_med = quantile(ratio, rounds, 0.5), r_20 = quantile(ratio, rounds, 0.2),
               r_80 = quantile(ratio, rounds, 0.8);
  printf("%.4f %.4f %.4f %.4f %.4f %.4f %.4f %.4f %.3f %.3f\n",
         quantile(t_adam, rounds, 0.5) * 1e3, quantile(t_fadam, rounds, 0.5) * 1e3,
         quantile(t_a, rounds, 0.5) * 1e3, r_med, r_20, r_80,
         quantile(ratio_no_check, rounds, 0.5), quantile(ratio_two_pass, rounds, 0.5),
         adam_bytes / total, fadam_bytes / total);
  return 0;
}
