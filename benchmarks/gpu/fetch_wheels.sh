#!/usr/bin/env bash
# The Python 3.12 wheels the GPU machine lacks (its image has torch, transformers, pytest, httpx,
# tokenizers, safetensors, jinja2, prometheus_client, but no fastapi, uvicorn, pydantic or gguf),
# downloaded here into .whl/ (ignored by git; about 3.4 MB), for check.sh to install there:
#   bash benchmarks/gpu/fetch_wheels.sh   # then carry .whl with the device tool's run
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl
for pkg in fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
    typing-inspection==0.4.5 annotated-doc==0.0.7 typing_extensions==4.16.0 anyio==4.16.0 opentelemetry-api==1.45.2 \
    uvicorn==0.55.0 gguf==0.19.0; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$pkg"
done
ls .whl
