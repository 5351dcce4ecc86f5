/* Start/stop points for callgrind's instruction count, called from Python through ctypes
 * (bench/icount.py builds this file on first use). Valgrind's client requests are magic instruction
 * sequences that its headers expand; outside valgrind they do nothing. */
#include <valgrind/callgrind.h>

int icount_on_valgrind(void) { return RUNNING_ON_VALGRIND; }

/* The measured region starts instrumented with zeroed counters: everything before it (imports,
 * fixtures, the warm-up call) runs uninstrumented, several times faster. */
void icount_start(void) {
    CALLGRIND_START_INSTRUMENTATION;
    CALLGRIND_ZERO_STATS;
}

/* One dump per region, named after the benchmark, then back to uninstrumented running. */
void icount_stop(const char *name) {
    CALLGRIND_DUMP_STATS_AT(name);
    CALLGRIND_STOP_INSTRUMENTATION;
}
