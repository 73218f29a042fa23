"""Training data: the corpus a run trains on, embedded text or a prepared folder behind one interface
(corpus), sequences and splits shared by training and preparation (sequences), and `mpifed data
prepare` (reading, prepare)."""
