#!/bin/sh
# Wheels for benchmarks/gpu.py on a GPU machine whose Python (3.12) already has torch,
# transformers, accelerate, safetensors, numpy, pyarrow, pyyaml, psutil and friends but not
# this project's other dependencies. Run here (with network), into ./.whl:
#
#     sh benchmarks/gpu_wheels.sh            # core: represent, train, merge, evaluate
#     sh benchmarks/gpu_wheels.sh e2e        # and Prefect's, for the end-to-end stage
#
# then, there:  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#               PYTHONPATH=$PWD:/tmp/site python3 benchmarks/gpu.py
# Versions are those this repository is tested with.
set -e
CORE="pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
mergekit==0.1.5 immutables==0.21 mistral-common==1.13.1 jsonschema==4.26.0
jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 pydantic-extra-types==2.11.1
rapidfuzz==3.14.6"
E2E="prefect==3.9.1 aiosqlite==0.22.1 alembic==1.20.1 amplitude-analytics==1.3.0 apprise==2.0.1
asgi-lifespan==2.1.0 asyncpg==0.32.0 beartype==0.23.1 cachetools==7.3.3 cffi==2.1.1 coolname==5.0.0
cronsim==2.8 cryptography==50.0.2 cyclopts==5.5.2 dateparser==1.5.0 docker==7.2.0 docstring-parser==0.18.0
exceptiongroup==1.3.2 fastapi==0.150.0 graphviz==0.21 griffe==2.4.1 griffecli==2.4.1 griffelib==2.4.1
jinja2-humanize-extension==0.4.0 jsonpatch==1.48 jsonpointer==3.12 mako==1.4.3 oauthlib==4.0.1
opentelemetry-api==1.45.2 orjson==3.13.0 pendulum==3.3.0 py-key-value-aio==0.5.0 pycparser==3.12
pydantic-settings==2.16.3 pydocket==0.27.2 python-dotenv==1.2.4 python-json-logger==4.2.0
python-slugify==9.1.3 pytz==2026.6 readchar==4.2.2 redis==8.1.0 burner-redis==0.1.7 requests-oauthlib==2.0.0
rfc3339-validator==0.1.4 rich-rst==2.2.0 ruamel-yaml==0.19.1 semver==3.1.2 sniffio==1.3.1 sqlalchemy==2.1.9
starlette==1.10.0 text-unidecode==1.3 toml==0.10.2 truststore==0.10.5 tzdata==2026.6 tzlocal==5.4.5
uncalled-for==0.6.2 uvicorn==0.54.0 websockets==16.1.1 whenever==0.11.0 greenlet h2 hpack hyperframe"
WANT="$CORE"
[ "$1" = "e2e" ] && WANT="$CORE $E2E"
mkdir -p .whl
for spec in $WANT; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "$spec"
done
du -sh .whl
