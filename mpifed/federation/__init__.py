"""Federation: what crosses facilities each round and how it is combined into the global model."""
