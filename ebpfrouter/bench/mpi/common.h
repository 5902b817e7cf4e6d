/* Shared helpers for the ebpf-router MPI benchmarks (OSU-style, written for this project).
 * Usage of every program: PROG MAX_BYTES ITERATIONS SETTLE_SECONDS
 * Output on rank 0: "# <name> <unit>" then one "<bytes> <value>" line per message size. */
#ifndef EBR_MPI_COMMON_H
#define EBR_MPI_COMMON_H
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static long ebr_arg(int argc, char **argv, int i, long dflt)
{
    return argc > i ? strtol(argv[i], NULL, 10) : dflt;
}

/* Fewer iterations for big messages so a run stays short. */
static int ebr_iters(long size, long iters)
{
    long n = size > 8192 ? iters * 8192 / size : iters;
    return (int)(n < 10 ? 10 : n);
}

/* Let the connections open (first exchange), then sit still for `settle` seconds, so a
 * router can move them before anything is timed. Same pause in every mode. */
static void ebr_settle(long settle)
{
    MPI_Barrier(MPI_COMM_WORLD);
    if (settle > 0)
        sleep((unsigned)settle);
    MPI_Barrier(MPI_COMM_WORLD);
}
#endif
