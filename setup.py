"""Packaging for mpifed. Install torch first (`pip install torch==2.13.0` on CPU machines, the site's
build on GPU machines); the range below is then already satisfied and pulls nothing."""
import re
from pathlib import Path

from setuptools import find_packages, setup

VERSION = re.search(r'__version__ = "([^"]+)"', Path("mpifed/__init__.py").read_text()).group(1)

setup(
    name="mpifed",
    version=VERSION,
    description="Federated LLM training across HPC facilities over MPI",
    long_description=Path("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["mpifed", "mpifed.*"]),
    package_data={"mpifed.federation": ["kernels.c"]},  # the codecs' C kernels, built at first use
    install_requires=[
        "torch>=2.4",
        "mpi4py>=4.0",
        "transformers>=4.45",
        "datasets>=3.0",
        "h5py>=3.10",
        "click>=8.1",
        "numpy>=1.26",
        "xxhash>=3.0",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "cryptography>=42",  # sealed links between sites: AEAD and HKDF (mpifed/comm/seal.py)
    ],
    extras_require={
        # The embedded MPI: the MPICH wheel. Site MPIs are used instead through MPI4PY_LIBMPI.
        "mpich": ["mpich"],
        "deepspeed": ["deepspeed>=0.15"],
        "lora": ["peft>=0.13"],
        # `mpifed report`: plots of runs, as PNG and a self-contained HTML page.
        "report": ["matplotlib>=3.8"],
        "dev": ["mpich", "deepspeed>=0.15", "peft>=0.13", "matplotlib>=3.8", "pytest>=8", "pytest-timeout>=2.3",
                "hypothesis>=6.100"],
    },
    # Site profiles and launch wrappers, found under share/mpifed by mpifed.sites and mpifed.project.
    data_files=[("share/mpifed/sitecfg", sorted(str(p) for p in Path("sitecfg").glob("*.toml"))),
                ("share/mpifed/launch", sorted(str(p) for p in Path("launch").glob("*.sh")))],
    entry_points={"console_scripts": ["mpifed = mpifed.cli.main:main"]},
)
