/* One-way core-to-core latency between the first two CPUs this process may run on, in ns.
 *
 * Two threads, pinned one per CPU, pass a counter back and forth through one cache line; the
 * time per hand-over is the latency of moving that line between the two cores. It tells where the
 * host put the two CPUs: sharing an L3 (20-70 ns) or not (80-300 ns; bench/NOTES.md has what a
 * 2-vCPU VM read). placement.py (beside it) builds this with the C compiler and runs it around
 * each timed sample of the step benchmark.
 *
 * Usage: core_to_core [round_trips]   (default 20000: 1-7 ms). Prints the latency in ns: the
 * fastest of 4 timings of a quarter of the round trips each.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static _Atomic long line;  /* the cache line the two threads pass back and forth */
static long trips;

enum { kTimings = 4 };
/* The hand-overs main() times: kTimings timings of trips / kTimings each. */
static long trips_done(void) {
  const long per = trips / kTimings > 0 ? trips / kTimings : 1;
  return per * kTimings;
}

static cpu_set_t one_cpu(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  return set;
}

static void* responder(void* arg) {
  (void)arg;
  for (long i = 0; i < trips_done(); ++i) {
    while (atomic_load_explicit(&line, memory_order_acquire) != 2 * i + 1) {
    }
    atomic_store_explicit(&line, 2 * i + 2, memory_order_release);
  }
  return NULL;
}

int main(int argc, char** argv) {
  trips = argc > 1 ? atol(argv[1]) : 20000;
  cpu_set_t allowed;
  if (trips < 1 || sched_getaffinity(0, sizeof allowed, &allowed) != 0) {
    return 2;
  }
  int cpus[2], found = 0;
  for (int c = 0; c < CPU_SETSIZE && found < 2; ++c) {
    if (CPU_ISSET(c, &allowed)) {
      cpus[found++] = c;
    }
  }
  if (found < 2) {
    fprintf(stderr, "core_to_core: needs two CPUs, this process may use %d\n", found);
    return 3;
  }
  /* The responder is created on its CPU (no unpinned start), or not at all. */
  const cpu_set_t mine = one_cpu(cpus[0]), theirs = one_cpu(cpus[1]);
  pthread_attr_t attr;
  pthread_t t;
  if (pthread_setaffinity_np(pthread_self(), sizeof mine, &mine) != 0 ||
      pthread_attr_init(&attr) != 0 ||
      pthread_attr_setaffinity_np(&attr, sizeof theirs, &theirs) != 0 ||
      pthread_create(&t, &attr, responder, NULL) != 0) {
    fprintf(stderr, "core_to_core: cannot pin two threads to CPUs %d and %d\n", cpus[0], cpus[1]);
    return 4;
  }
  /* The fastest of kTimings timings of trips / kTimings hand-overs each: a thread of the
   * benchmarked process that is still spinning on a CPU slows a timing down, never speeds it up. */
  const long per = trips_done() / kTimings;
  double best = 0.0;
  for (long k = 0; k < kTimings; ++k) {
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = k * per; i < (k + 1) * per; ++i) {
      atomic_store_explicit(&line, 2 * i + 1, memory_order_release);
      while (atomic_load_explicit(&line, memory_order_acquire) != 2 * i + 2) {
      }
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    const double ns = ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / (2.0 * per);
    best = k == 0 || ns < best ? ns : best;
  }
  pthread_join(t, NULL);
  printf("%.1f\n", best);
  return 0;
}
