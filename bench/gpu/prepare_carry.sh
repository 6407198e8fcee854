#!/usr/bin/env bash
# What the GPU machine lacks, for bench/gpu/run_on_device.sh, packed as .gpu_carry.tar.xz (git-ignored; carried to
# the device with the run tool's carry=[".gpu_carry.tar.xz"]). The device has torch (CUDA), transformers, peft,
# accelerate and their dependencies, no network, and none of mlflow, trl, datasets, bitsandbytes, liger-kernel.
# Versions are this venv's (what the CPU tests ran with).
# Binary wheels are for ONE Python version, PY_VERSION (default 3.12): the device's is not known beforehand
# (run_on_device.sh prints it and says so on a mismatch), and pyarrow + pandas alone are ~46 MiB a version, so two
# versions do not fit the 64 MiB carry. Three wheels are slimmed: bitsandbytes keeps its CPU and CUDA 13 libraries
# only (the device had torch 2.11.0+cu130), pyarrow drops Flight and Gandiva, mlflow its web UI. The
# wheels are unpacked into one folder named site-packages (dill, which datasets hashes with, pickles a module by
# value unless its path says site-packages or the interpreter's prefix: under another name datasets failed with
# "Can't pickle <class 'MonthDayNano'>") with a dist-info declaring the plugin's `mlflow.project_backend` entry point
# (the plugin's code itself is the repository, on PYTHONPATH), then packed with xz. Prints the sizes.
#
# LLAMAFACTORY=1 adds LLaMA-Factory 0.9.5 and the libraries it pins (transformers, peft, trl, datasets, accelerate,
# ...: pure-Python wheels) in a folder of their own, lf/site-packages, for train_throughput.py's llamafactory sides
# (run_on_device.sh puts it on $BENCH_LF_SITE), with the tokenizers transformers 5.6 accepts; the rest it needs
# (torch, pyarrow, pandas, huggingface_hub) the device has.
# PANDAS=0 leaves pandas out (the device's own is used, 11 MiB packed): the room LLaMA-Factory's wheels need beside
# the repository in one 64 MiB carry. BITSANDBYTES=0 leaves bitsandbytes out too (QLoRA only; 41 MiB as downloaded,
# about 3 MiB once slimmed): `LLAMAFACTORY=1 PANDAS=0` with it packed to 54 MiB (2026-11-29, Python 3.12 wheels),
# one archive for bench/gpu/memory_plan_check.py (QLoRA) and train_throughput.py's LLaMA-Factory sides.
#
#   bash bench/gpu/prepare_carry.sh                 # from anywhere, with the project's venv active
#   PY_VERSION=3.11 bash bench/gpu/prepare_carry.sh
#   LLAMAFACTORY=1 PANDAS=0 bash bench/gpu/prepare_carry.sh     # QLoRA too, and LLaMA-Factory's sides
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=.gpu_wheels
PY_VERSION=${PY_VERSION:-3.12}
rm -rf "$OUT" && mkdir -p "$OUT"

ver() { python -c "import importlib.metadata as m; print(m.version('$1'))"; }
pins() { for p in $1; do v=$(ver "$p" 2>/dev/null) && echo "$p==$v"; done; }

# Pure-Python wheels (one file serves every Python).
PURE="mlflow-skinny mlflow-tracing mlflow trl datasets liger-kernel dill multiprocess alembic Mako sqlparse cachetools
      cloudpickle opentelemetry-api opentelemetry-sdk opentelemetry-proto opentelemetry-semantic-conventions
      importlib_metadata zipp databricks-sdk google-auth pyasn1 pyasn1-modules rsa gitpython gitdb smmap
      graphene graphql-core graphql-relay Flask Werkzeug itsdangerous blinker gguf bm25s rouge_score nltk
      sacrebleu portalocker tabulate colorama python-dateutil six pytz tzdata click docker absl-py
      requests urllib3 idna certifi python-dotenv fastapi starlette pycparser"
# Binary wheels, for PY_VERSION.
BINARY="protobuf pyarrow pandas xxhash SQLAlchemy greenlet pydantic_core pydantic annotated-types typing-inspection
        MarkupSafe joblib cryptography cffi charset-normalizer"
PLATFORMS="--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_34_x86_64"

python -m pip download -q --no-deps -d "$OUT" $(pins "$PURE")
# liger-kernel is not installed on the CPU machine (its Triton kernels run on GPUs only): its newest release, pinned.
python -m pip download -q --no-deps -d "$OUT" "liger-kernel==${LIGER_VERSION:-0.8.5}"
BNB=$([ "${BITSANDBYTES:-1}" = 0 ] || echo "bitsandbytes==$(ver bitsandbytes)")
[ "${PANDAS:-1}" = 0 ] && BINARY=${BINARY/pandas /}
python -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" $PLATFORMS -d "$OUT" \
  $(pins "$BINARY") $BNB
# LLaMA-Factory's own pins (its installed set on the CPU machine: bench/peer_llamafactory.py), downloaded apart
LF="llamafactory==0.9.5 transformers==5.6.0 peft==0.18.1 trl==0.24.0 datasets==4.0.0 accelerate==1.11.0 dill==0.3.8
    multiprocess==0.70.16 fsspec==2025.3.0 omegaconf==2.4.0 fire==0.7.1 termcolor==3.3.0
    liger-kernel==${LIGER_VERSION:-0.8.5} tokenizers==0.22.2"
[ "${LLAMAFACTORY:-0}" = 0 ] || python -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" $PLATFORMS \
  -d "$OUT/lf" $LF

python - "$OUT" .gpu_carry/site-packages "$(ver mlflow-finetune-plugin)" <<'PY'
import pathlib, re, shutil, sys, zipfile

wheels, site, version = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
# Members left out (not used by training): other GPUs' bitsandbytes builds, pyarrow's RPC/query-plan/JIT parts and
# tests, mlflow's web UI (pyarrow's lib needs libarrow_substrait; mlflow.genai imports mlflow.gateway).
DROP = re.compile(r"libbitsandbytes_(cuda(11|12)\d|cuda132|rocm|xpu)|pyarrow/(.*flight|.*gandiva|tests/)"
                  r"|mlflow/server/js/|/__pycache__/")
shutil.rmtree(site.parent, ignore_errors=True)
site.mkdir(parents=True)
total = 0
for whl in sorted([*wheels.glob("*.whl"), *wheels.glob("lf/*.whl")]):
    total += whl.stat().st_size
    into = site.parent / "lf" / "site-packages" if whl.parent.name == "lf" else site  # named so for dill, as above
    with zipfile.ZipFile(whl) as z:
        for member in z.infolist():
            if not DROP.search(member.filename):
                z.extract(member, into)
info = site / f"mlflow_finetune_plugin-{version}.dist-info"
info.mkdir()
(info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: mlflow-finetune-plugin\nVersion: {version}\n")
(info / "entry_points.txt").write_text(
    "[mlflow.project_backend]\nfinetune = mlflow_finetune_plugin.backend:FinetuneBackend\n")
(info / "top_level.txt").write_text("mlflow_finetune_plugin\n")
print(f"{len(list(wheels.glob('*.whl')) + list(wheels.glob('lf/*.whl')))} wheels, {total / 2**20:.1f} MiB as downloaded")
PY
rm -f .gpu_carry.tar.xz
XZ_OPT="-6 -T2" tar -C .gpu_carry -cJf .gpu_carry.tar.xz site-packages $([ -d .gpu_carry/lf ] && echo lf)
rm -rf .gpu_carry
size=$(stat -c %s .gpu_carry.tar.xz)
echo ".gpu_carry.tar.xz: $((size / 1048576)) MiB, binary wheels for Python $PY_VERSION"
[ "$size" -lt $((60 * 1048576)) ] || { echo "OVER 60 MiB: leave something out"; exit 1; }
