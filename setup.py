"""lars_tf: LARS + mixed precision + Horovod for large-batch distributed training."""

from setuptools import setup

setup(
    name="lars_tf",
    version="0.1.0",
    description="Large-batch distributed training on Horovod: LARS, FP16 loss scaling, tf.data",
    python_requires=">=3.11,<3.14",
    # The model zoo lives in the top-level models/ folder and is imported as lars_tf.models.
    packages=["lars_tf", "lars_tf.data", "lars_tf.models"],
    package_dir={"lars_tf.models": "models"},
    # TensorFlow and Horovod are not listed: the right TF build (CPU or CUDA) and a Horovod
    # compiled against it come from tools/setup_env.sh, pinned in constraints.txt.
    install_requires=["absl-py", "numpy"],
    entry_points={
        "console_scripts": [
            "lars-train=lars_tf.cli:train_main",
            "lars-convert=lars_tf.convert_cli:main",
        ],
    },
)
