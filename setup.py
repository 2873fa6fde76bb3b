"""fundax: text-to-fundus latent diffusion in JAX/Flax that improves itself from feedback."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.6,<0.12",
    "flax>=0.10,<0.14",
    "optax>=0.2.4,<0.3",
    "orbax-checkpoint>=0.11,<0.14",
    "ml_collections>=1.0,<2",
    "numpy>=1.26,<3",
    "scipy>=1.11,<2",
    "scikit-image>=0.24,<0.30",
    "pillow>=10,<14",
    "tensorflow-datasets>=4.9.7,<5",
    "array_record>=0.7,<0.10",
    "grain>=0.2.10,<0.3",
    "transformers>=4.50,<6",
    "tokenizers>=0.20,<0.30",
    "safetensors>=0.4,<0.8",
    "matplotlib>=3.8,<4",
    "tqdm>=4.66,<5",
    # TensorBoard event files of every trainer's metrics (fundax.train.metric_writers), without
    # TensorFlow.
    "tensorboardX>=2.6,<3",
    # jax.export (de)serialisation: a user's exported Inception feature function (fundax.eval).
    "flatbuffers>=24,<26",
    # tensorflow-datasets imports it for builders defined in packages but declares it only for
    # Python < 3.9.
    "importlib_resources>=5",
    # The rating store (fundax.feedback.store), which the RLHF loop's simulated raters write.
    "sqlalchemy>=2.0,<3",
]

# The feedback web app (fundax.feedback.app, `fundax feedback serve`): web server and forms.
WEB = [
    "fastapi>=0.115,<1",
    "uvicorn>=0.30,<1",
    "python-multipart>=0.0.13,<0.1",
]

EXTRAS = {
    "web": WEB,
    # Tests: PyTorch reference models for parity (CPU build pinned; an unpinned torch pulls CUDA),
    # and the web app's stack for its tests.
    "test": WEB + [
        "pytest>=8,<10",
        # Two workers compile XLA programs side by side (pytest.ini: -n auto).
        "pytest-xdist>=3.5,<4",
        "torch==2.13.0",
        "diffusers>=0.30,<1",
        "openpyxl>=3.1,<4",
        "httpx>=0.27,<1",
        "playwright>=1.45,<2",  # drives Debian's chromium; never downloads a browser
        "schemathesis>=4,<5",
        "hypothesis>=6,<7",
        "psycopg[binary]>=3.1,<4",
        # Independent reference answers for kappa and AUROC (tests/test_eval_consistency.py).
        "scikit-learn>=1.4,<2",
        # libtpu (XLA's TPU compiler, matched to jax): tests/test_aot.py compiles for a TPU
        # topology on the CPU host.
        "jax[tpu]>=0.6,<0.12",
    ],
    # A PostgreSQL server as the feedback store (a SQLite file needs nothing extra).
    "postgres": ["psycopg[binary]>=3.1,<4"],
    # Reading ODIR-5K's original .xlsx annotation (a CSV export needs nothing extra).
    "odir": ["openpyxl>=3.1,<4"],
    # Cloud TPU VMs, and `fundax aot` (compiling for a TPU topology on a CPU host): jax[tpu]
    # pins the libtpu release built for that jax (jax 0.10.2: libtpu 0.0.42.*).
    "tpu": ["jax[tpu]>=0.6,<0.12"],
}

setup(
    name="fundax",
    version="0.1.0",
    description="Synthetic colour fundus photographs from clinical text, with JAX/Flax latent "
    "diffusion and a human-feedback self-improvement loop.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The top-level configs/ (where a checkout keeps them) ships as fundax.configs, so configs
    # resolve by name in an installed wheel too (fundax.configlib).
    packages=find_packages(include=["fundax", "fundax.*"]) + ["fundax.configs"],
    package_dir={"fundax.configs": "configs"},
    # The shipped evaluators (trained by bench/judges.py --ship; see fundax/eval/evaluator_train.py)
    # and autoencoders (bench/autoencoder.py --ship; fundax.models.ldm.SHIPPED_VAES).
    package_data={"fundax.eval": ["evaluators/**/*"], "fundax.models": ["autoencoders/**/*"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["fundax=fundax.cli:main"]},
)
