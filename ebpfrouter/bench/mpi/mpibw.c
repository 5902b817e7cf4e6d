/* Point-to-point bandwidth: rank 0 sends a window of messages to rank 1, which acks each
 * window; megabytes (10^6) per second. */
#include "common.h"

#define WINDOW 64

int main(int argc, char **argv)
{
    int rank, size_world;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size_world);
    long max = ebr_arg(argc, argv, 1, 1 << 22), iters = ebr_arg(argc, argv, 2, 100);
    long settle = ebr_arg(argc, argv, 3, 0);
    if (size_world < 2) {
        fprintf(stderr, "mpibw: needs 2 ranks\n");
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    char *buf = malloc(max > 0 ? max : 1);
    memset(buf, 'b', max > 0 ? max : 1);
    char ack = 0;
    MPI_Request req[WINDOW];
    if (rank < 2)
        MPI_Sendrecv_replace(&ack, 1, MPI_CHAR, 1 - rank, 0, 1 - rank, 0, MPI_COMM_WORLD,
                             MPI_STATUS_IGNORE);
    ebr_settle(settle);
    if (rank == 0)
        printf("# mpibw MB/s\n");
    for (long size = 1; size <= max; size *= 2) {
        int n = ebr_iters(size * 8, iters), warm = n / 10 + 1;
        double start = 0;
        for (int i = 0; i < n + warm; i++) {
            if (i == warm)
                start = MPI_Wtime();
            if (rank == 0) {
                for (int w = 0; w < WINDOW; w++)
                    MPI_Isend(buf, (int)size, MPI_CHAR, 1, 2, MPI_COMM_WORLD, &req[w]);
                MPI_Waitall(WINDOW, req, MPI_STATUSES_IGNORE);
                MPI_Recv(&ack, 1, MPI_CHAR, 1, 3, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            } else if (rank == 1) {
                for (int w = 0; w < WINDOW; w++)
                    MPI_Irecv(buf, (int)size, MPI_CHAR, 0, 2, MPI_COMM_WORLD, &req[w]);
                MPI_Waitall(WINDOW, req, MPI_STATUSES_IGNORE);
                MPI_Send(&ack, 1, MPI_CHAR, 0, 3, MPI_COMM_WORLD);
            }
        }
        double elapsed = MPI_Wtime() - start;
        if (rank == 0) {
            printf("%ld %.3f\n", size, (double)size * WINDOW * n / elapsed / 1e6);
            fflush(stdout);
        }
    }
    free(buf);
    MPI_Finalize();
    return 0;
}
