"""Packaging for mnist-distill: the `trainer` package and the `mnist-distill` console script.

Exact versions live in requirements.txt (what CI and the image install); these are the ranges the
code is written against.
"""

import os

from setuptools import find_packages, setup

# Which TensorFlow distribution the package asks for. Both install the same `tensorflow` module;
# the CPU image is built on `tensorflow-cpu` (no CUDA build, no cuInit errors) and its builder sets
# MNIST_DISTILL_TENSORFLOW=tensorflow-cpu, so that `pip check` there finds what the wheel requires.
TENSORFLOW = os.environ.get("MNIST_DISTILL_TENSORFLOW", "tensorflow")
if TENSORFLOW not in ("tensorflow", "tensorflow-cpu"):
  raise SystemExit(f"MNIST_DISTILL_TENSORFLOW: tensorflow or tensorflow-cpu, not {TENSORFLOW!r}")

setup(
    name="mnist-distill",
    version="0.1.0",
    description="Teacher CNN on MNIST distilled into small students under tf.distribute.",
    packages=find_packages(include=["trainer", "trainer.*"]),
    python_requires=">=3.10",
    install_requires=[
        f"{TENSORFLOW}>=2.21,<2.22",
        "keras>=3.15,<3.16",
        "tensorflow-datasets>=4.9.10,<4.10",
        "absl-py>=2.1",
        "google-cloud-storage>=3.0,<4",
        "tensorboard>=2.21,<2.22",
        "matplotlib>=3.8",
    ],
    entry_points={"console_scripts": ["mnist-distill=trainer.cli:run"]},
)
