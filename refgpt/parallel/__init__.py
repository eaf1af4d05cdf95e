"""Parallel execution over MPI. Data, tensor, pipeline and ZeRO parallelism are built here."""
