/* Point-to-point latency: ranks 0 and 1 ping-pong; half the round trip, microseconds. */
#include "common.h"

int main(int argc, char **argv)
{
    int rank, size_world;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size_world);
    long max = ebr_arg(argc, argv, 1, 1 << 20), iters = ebr_arg(argc, argv, 2, 1000);
    long settle = ebr_arg(argc, argv, 3, 0);
    if (size_world < 2) {
        fprintf(stderr, "mpilat: needs 2 ranks\n");
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    char *buf = malloc(max > 0 ? max : 1);
    memset(buf, 'a', max > 0 ? max : 1);
    if (rank < 2) /* open the connection before settling */
        MPI_Sendrecv_replace(buf, 1, MPI_CHAR, 1 - rank, 0, 1 - rank, 0, MPI_COMM_WORLD,
                             MPI_STATUS_IGNORE);
    ebr_settle(settle);
    if (rank == 0)
        printf("# mpilat us\n");
    for (long size = 1; size <= max; size *= 2) {
        int n = ebr_iters(size, iters), warm = n / 10 + 1;
        double start = 0;
        for (int i = 0; i < n + warm; i++) {
            if (i == warm)
                start = MPI_Wtime();
            if (rank == 0) {
                MPI_Send(buf, (int)size, MPI_CHAR, 1, 1, MPI_COMM_WORLD);
                MPI_Recv(buf, (int)size, MPI_CHAR, 1, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            } else if (rank == 1) {
                MPI_Recv(buf, (int)size, MPI_CHAR, 0, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
                MPI_Send(buf, (int)size, MPI_CHAR, 0, 1, MPI_COMM_WORLD);
            }
        }
        double elapsed = MPI_Wtime() - start;
        if (rank == 0) {
            printf("%ld %.3f\n", size, elapsed * 1e6 / (2.0 * n));
            fflush(stdout);
        }
    }
    free(buf);
    MPI_Finalize();
    return 0;
}
