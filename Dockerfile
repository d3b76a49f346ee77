# lorae on a GPU node: PyTorch's CUDA runtime image plus lorae with all extras, run as a
# non-root user. Data and run outputs are volumes, so nothing written inside the container is
# lost when it exits. Build and use (see docs/cluster.md for Apptainer and SLURM):
#   docker build -t lorae .
#   docker run --gpus all -v /path/to/data:/data -v /path/to/runs:/runs lorae \
#     fit --config /opt/lorae/configs/quickstart.yaml
# The base image's torch (2.5.1) satisfies pyproject.toml's torch>=2.4, so pip keeps it.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/lorae
COPY pyproject.toml README.md ./
COPY lorae ./lorae
COPY configs ./configs
# Non-editable: the image holds an installed package, not a link to this build context.
# DL3013 (pin versions) does not apply: this installs the project itself, whose
# pyproject.toml states the dependency ranges.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[all]"

RUN groupadd --gid 1000 lorae \
    && useradd --uid 1000 --gid 1000 --create-home lorae \
    && mkdir -p /data /runs \
    && chown 1000:1000 /data /runs
USER 1000:1000
# Downloaded weights (torchvision, timm, Hugging Face) are cached under /runs/.cache, on the
# mounted volume, so a later container reuses them.
ENV TORCH_HOME=/runs/.cache/torch \
    HF_HOME=/runs/.cache/huggingface
# Relative output paths (a config's `save_dir: runs`, lightning_logs/) land on the volume;
# the shipped configs are under /opt/lorae/configs.
WORKDIR /runs
VOLUME ["/data", "/runs"]
ENTRYPOINT ["lorae"]
CMD ["--help"]
