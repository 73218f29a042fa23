"""MPI and nothing else: the communicators of a job (topology), pickle-free control values (control),
deadlines and aborts (watchdog), and separately launched facilities joining over MPI ports (join)."""
