"""The federation of one round: the hierarchical reduction across facilities (reduce), the outer
optimizers (outer) and the codecs of the cross-facility hop (compress)."""
