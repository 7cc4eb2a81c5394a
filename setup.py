"""monoformer_jax: MonoFormer in JAX/Flax NNX."""

from setuptools import find_packages, setup

setup(
  name="monoformer_jax",
  version="0.1.0",
  description="MonoFormer: one transformer for autoregressive text and "
  "diffusion images, in JAX/Flax NNX",
  long_description=open("README.md", encoding="utf-8").read(),
  long_description_content_type="text/markdown",
  packages=find_packages(include=["monoformer_jax", "monoformer_jax.*"]),
  package_data={"monoformer_jax": ["data/*.tsv"]},
  include_package_data=True,
  python_requires=">=3.11",
  install_requires=[
    # Lower bounds only: CI runs Python 3.11 (jax 0.10.2), GPU hosts 3.12 (jax 0.11+).
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "grain>=0.2.18",  # the input pipeline's MapDatasets
    "tensorflow-datasets>=4.9.7",  # dataset builders, read without TensorFlow
    "array-record>=0.7",  # TFDS's file format here
    "importlib-resources>=6",  # TFDS needs it for builders outside its own tree
    "ml-collections>=1.1.0",
    "einops>=0.8.2",  # patchify / unpatchify
    "absl-py>=2.3",
    "numpy>=2.0",
    "Pillow>=11.0",
    "scikit-learn>=1.6",  # the digits default and its classifier
    "tqdm>=4.66",
    "ml-dtypes>=0.5",  # bfloat16 safetensors (TinyLlama ships them)
    "sentencepiece>=0.2",  # Llama's tokenizer.model
    "tokenizers>=0.20",  # or an HF tokenizer.json
    # weights, VAE and tokenizer named by hub id (monoformer_jax/hub.py): its cache,
    # HF_HOME, HF_HUB_OFFLINE and tokens for gated repos
    "huggingface_hub>=0.25",
    "tensorboardX>=2.6",  # TensorBoard events without TensorFlow (clu's writers import it)
    # gs:// paths: etils.epath (Orbax's, TFDS's and ours) reaches GCS through
    # fsspec's gcsfs; google-cloud-storage writes TensorBoard events there and
    # makes the workdir lock (an object created only if absent).
    "etils[epath]>=1.7",
    "gcsfs>=2024.2",
    "google-cloud-storage>=2.14",
  ],
  extras_require={
    # The notebook's own needs (Colab has them) are in `test`, which runs it.
    # safetensors: the tests write fixtures with it; the package reads and
    # writes the format itself (monoformer_jax/safetensors_io.py).
    # chex: the tests' tree and shape assertions. jax[tpu] (libtpu of the
    # installed jax, ~700 MB): tests/test_compile.py compiles for TPU slices.
    # jax[cuda12-local]: JAX's CUDA plugin of the installed jax (~460 MB) and
    # none of NVIDIA's CUDA libraries (the -local extras leave those to the
    # host): tests/test_compile.py compiles the step for H100s with its Triton
    # kernels; without CUDA the plugin only plans, and JAX_PLATFORMS=cpu
    # (tests/conftest.py) keeps every test on the CPU.
    # pyarrow: tests/test_commonsense.py reads task files in parquet.
    # pytest-timeout: a hung test (an XLA collective that never completes) fails
    # alone instead of stalling CI (setup.cfg sets the limit and the method).
    # ruff: the linter and formatter .ci/run checks first (pyproject.toml).
    "test": [
      "pytest>=8",
      "pytest-xdist>=3.6",
      "pytest-timeout>=2.3",
      "ruff>=0.6",
      "nbformat>=5.10",
      "nbclient>=0.10",
      "ipykernel>=6.29",
      "matplotlib>=3.8",
      "safetensors>=0.5",
      "chex>=0.1.92",
      "jax[tpu]>=0.10.2",
      "jax[cuda12-local]>=0.10.2",
      "pyarrow>=15",
      # tests/test_inception.py and test_pytorch_weights.py write .pth/.bin files with
      # it, test_inception.py checks the resize against it: the CPU wheel that lies on this machine's disk (a range pulls CUDA).
      "torch==2.13.0",
      # A real GCS-protocol server on localhost for the gs:// tests (tests/conftest.py).
      "gcp-storage-emulator>=2024.1",
    ],
    # TPU hosts, and `python -m monoformer_jax.compile` (plans for TPU slices from any host).
    "tpu": ["jax[tpu]>=0.10.2"],
    # NVIDIA GPU hosts (launch/gpu_slurm.sh): JAX's CUDA 12 plugin and the
    # nvidia-* wheels it runs on (CUDA runtime, cuBLAS, cuDNN, NCCL, ptxas, ...);
    # the host needs only NVIDIA's driver.
    "cuda": ["jax[cuda12]>=0.10.2"],
  },
)
