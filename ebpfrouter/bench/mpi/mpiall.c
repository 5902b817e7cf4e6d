/* All-to-all latency: MPI_Alltoall of SIZE bytes per peer on every rank; the mean over
 * ranks of each rank's average time per call, microseconds. */
#include "common.h"

int main(int argc, char **argv)
{
    int rank, nranks;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &nranks);
    long max = ebr_arg(argc, argv, 1, 1 << 16), iters = ebr_arg(argc, argv, 2, 200);
    long settle = ebr_arg(argc, argv, 3, 0);
    char *sbuf = malloc((size_t)max * nranks + 1), *rbuf = malloc((size_t)max * nranks + 1);
    memset(sbuf, 'c', (size_t)max * nranks + 1);
    MPI_Alltoall(sbuf, 1, MPI_CHAR, rbuf, 1, MPI_CHAR, MPI_COMM_WORLD); /* open connections */
    ebr_settle(settle);
    if (rank == 0)
        printf("# mpiall us\n");
    for (long size = 1; size <= max; size *= 2) {
        int n = ebr_iters(size * nranks, iters), warm = n / 10 + 1;
        double start = 0;
        for (int i = 0; i < n + warm; i++) {
            if (i == warm) {
                MPI_Barrier(MPI_COMM_WORLD);
                start = MPI_Wtime();
            }
            MPI_Alltoall(sbuf, (int)size, MPI_CHAR, rbuf, (int)size, MPI_CHAR, MPI_COMM_WORLD);
        }
        double mine = (MPI_Wtime() - start) * 1e6 / n, sum = 0;
        MPI_Reduce(&mine, &sum, 1, MPI_DOUBLE, MPI_SUM, 0, MPI_COMM_WORLD);
        if (rank == 0) {
            printf("%ld %.3f\n", size, sum / nranks);
            fflush(stdout);
        }
    }
    free(sbuf);
    free(rbuf);
    MPI_Finalize();
    return 0;
}
