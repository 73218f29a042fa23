"""The per-rank program: the entry point and only reader of the launch's world communicator (rank), the round loop
(trainer), the inner learning-rate schedule (schedule) and the per-round metrics (metrics)."""
