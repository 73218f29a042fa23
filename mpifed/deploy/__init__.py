"""Deploying across sites: site profiles (sites) and the project folder `mpifed config new` writes,
with one batch script per facility (project)."""
