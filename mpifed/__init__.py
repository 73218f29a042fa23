"""mpifed: one MPI program that trains a language model across several HPC facilities at once.

Each facility trains locally; every H local steps the facilities' roots reduce what they learned over
MPI, apply an outer optimizer and checkpoint the global model to HDF5. See README.md.
"""

__version__ = "0.1.0"
