"""`python -m mpifed` is the `mpifed` command (used by `simulate` to start ranks under mpiexec)."""
from mpifed.cli.main import main

main()
