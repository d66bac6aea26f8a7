"""glmv-jax: GLM-4.1V / 4.5V / 4.6V vision-language models in JAX."""
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
requirements = [l.strip() for l in (here / "requirements.txt").read_text().splitlines()
                if l.strip() and not l.startswith("#")]

setup(
    name="glmv-jax",
    version="0.1.0",
    description="JAX/Flax NNX reproduction and training of GLM-4.1V-Thinking / GLM-4.5V / GLM-4.6V",
    packages=find_packages(include=["glmv_jax*", "experiments*"]),
    python_requires=">=3.10",
    install_requires=requirements,
    extras_require={
        # HF transformers on PyTorch (CPU) is the parity oracle for models and processors.
        "test": ["torch==2.13.0", "transformers==5.24.0", "pytest>=8", "pytest-xdist>=3", "nbformat>=5"],
        # Ahead-of-time compiles for TPU topologies on a CPU host (python -m experiments.aot --topology=v5e:...).
        "tpu-aot": ["libtpu==0.0.42.1"],
    },
)
