"""Installs bat_jax: `pip install .`, or `pip install -e ".[test]"` to develop it."""

from setuptools import find_packages, setup

setup(
    name="bat_jax",
    version="0.1.0",
    description="Bridged Adversarial Training (BAT) and baselines in JAX/Flax.",
    license="Apache-2.0",
    packages=find_packages(include=["bat_jax", "bat_jax.*"]) + ["bat_jax.configs"],
    # The config files stay in configs/ at the top of the repository and are
    # installed as bat_jax/configs/, where `--config=configs/NAME.py` finds them
    # from any folder (configlib.config_file_path).
    package_dir={"bat_jax.configs": "configs"},
    # The PyTorch module file that bat_jax.export copies (not imported here).
    package_data={"bat_jax": ["data/*.npz", "export/torch_models.py.txt"]},
    # The floors are a combination the tests pass with. jaxlib 0.8.1 is the
    # first whose XLA knows the CPU flag the entry points set
    # (util.CPU_XLA_FLAGS; older ones abort on it), and jax >= 0.7 needs
    # Python 3.11. optax 0.2.5 is the first with `optax.tree.norm`;
    # orbax-checkpoint 0.11.20 fails to save a run's metadata, and
    # tensorflow-datasets 4.9.9 fails to read with protobuf 7.
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.8.1",
        "jaxlib>=0.8.1",
        "flax>=0.10.6",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11.40",
        "etils[epath]",
        "ml_collections>=1.0",
        "tensorflow-datasets>=4.9.10",
        "array_record>=0.7.1",
        "pillow>=10.4",
        "absl-py>=2.1",
        "numpy>=2.0",
        "matplotlib>=3.8",
        "tensorboardX>=2.6.2.2",
    ],
    # gcs: workdirs in Cloud Storage (gs://) through etils.epath's fsspec backend.
    extras_require={"test": ["pytest>=7", "chex>=0.1.89"], "gcs": ["gcsfs"]},
)
