"""Installs bat_jax: `pip install -e .[test]`."""

from setuptools import find_packages, setup

setup(
    name="bat_jax",
    version="0.1.0",
    description="Bridged Adversarial Training (BAT) and baselines in JAX/Flax.",
    license="Apache-2.0",
    packages=find_packages(include=["bat_jax", "bat_jax.*"]),
    # The PyTorch module file that bat_jax.export copies (not imported here).
    package_data={"bat_jax": ["data/*.npz", "export/torch_models.py.txt"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.30",
        "jaxlib>=0.4.30",
        "flax>=0.8",
        "optax>=0.2",
        "chex>=0.1.86",
        "orbax-checkpoint>=0.5",
        "ml_collections>=0.1.1",
        "tensorflow-datasets>=4.9.4",
        "array_record>=0.5",
        "pillow>=9",
        "absl-py>=1.0",
        "numpy>=1.24",
        "matplotlib>=3.6",
        "tensorboardX>=2.6",
    ],
    # gcs: workdirs in Cloud Storage (gs://) through etils.epath's fsspec backend.
    extras_require={"test": ["pytest>=7"], "gcs": ["gcsfs"]},
)
