"""Checkpoints: the HDF5 file format, written atomically and verified (format); who writes which part and
how every rank gets its state back on resume (manager); Hugging Face and LoRA exports (export).
`format` needs no torch and no MPI, so `mpifed ckpt verify` stays light."""
