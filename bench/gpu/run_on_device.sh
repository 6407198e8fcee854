#!/usr/bin/env bash
# On the lent GPU machine, from the repository root: unpack .gpu_carry.tar.xz (bench/gpu/prepare_carry.sh) onto
# PYTHONPATH, print what is there, and run a bench under a deadline, results in $OUT.
#   bash bench/gpu/run_on_device.sh [extra arguments]               # bench/gpu/train_throughput.py
#   BENCH=memory bash bench/gpu/run_on_device.sh [extra arguments]  # bench/gpu/memory_plan_check.py
# DEADLINE_S (default 450) is the bench's own deadline in seconds, counted from its start.
set -uo pipefail
cd "$(dirname "$0")/../.."
case "${BENCH:-throughput}" in
  throughput) BENCH_SCRIPT=bench/gpu/train_throughput.py ;;
  memory) BENCH_SCRIPT=bench/gpu/memory_plan_check.py ;;
  *) echo "BENCH=$BENCH: throughput (default) or memory"; exit 2 ;;
esac
OUT=${OUT:-/tmp/bench-out}; mkdir -p "$OUT"
SITE=/tmp/gpu-carry
start=$(date +%s)
rm -rf "$SITE" && mkdir -p "$SITE" && tar -C "$SITE" -xJf .gpu_carry.tar.xz || { echo "no .gpu_carry.tar.xz: carry it"; exit 2; }
export PYTHONPATH="$PWD:$SITE/site-packages${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$SITE/site-packages/bin:$PATH" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
[ -d "$SITE/lf/site-packages" ] && export BENCH_LF_SITE="$SITE/lf/site-packages"  # LLaMA-Factory's pinned libraries
echo "unpacked in $(( $(date +%s) - start )) s"
python - <<'PY' 2>&1 | tee "$OUT/versions.txt"
import importlib.metadata as md, platform, sys, glob, os
print("python", platform.python_version(), sys.executable)
carried = glob.glob(os.path.join(os.environ["PYTHONPATH"].split(":")[1], "pyarrow/lib.cpython-*"))
if carried and f"cpython-{sys.version_info.major}{sys.version_info.minor}" not in carried[0]:
    print(f"MISMATCH: the carried binary wheels are {os.path.basename(carried[0])}, this is Python "
          f"{platform.python_version()}: rerun bench/gpu/prepare_carry.sh with PY_VERSION="
          f"{sys.version_info.major}.{sys.version_info.minor} (the plain sides still run)")
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for pkg in ("transformers", "peft", "accelerate", "trl", "datasets", "mlflow", "bitsandbytes", "liger-kernel",
            "triton", "pyarrow", "pandas", "flash-attn", "kernels"):
    try:
        print(pkg, md.version(pkg))
    except md.PackageNotFoundError:
        print(pkg, "-")
try:
    import bitsandbytes
    print("bitsandbytes imports:", bitsandbytes.__version__)
except Exception as e:  # QLoRA will fail and say why; LoRA still runs
    print("IMPORT PROBLEM: bitsandbytes:", type(e).__name__, e)
try:
    import trl, datasets, mlflow  # noqa: F401
    from mlflow_finetune_plugin.models.kernels import liger_model_types
    print("liger covers llama:", "llama" in (liger_model_types() or ()))
except Exception as e:  # the plugin sides will fail and say why; the plain sides still run
    print("IMPORT PROBLEM:", type(e).__name__, e)
PY
[ -n "${BENCH_LF_SITE:-}" ] && PYTHONPATH="$BENCH_LF_SITE" python -c "import importlib.metadata as m
print('LLaMA-Factory side:', ', '.join(f'{p} {m.version(p)}' for p in ('llamafactory', 'transformers', 'peft', 'trl',
      'datasets', 'accelerate')))" 2>&1 | tee -a "$OUT/versions.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$OUT/versions.txt"
echo "starting the bench $(( $(date +%s) - start )) s in"
python "$BENCH_SCRIPT" --out "$OUT" --deadline-s "${DEADLINE_S:-450}" --workdir /tmp/bench-work "$@" \
  2>&1 | tee "$OUT/bench.log"
echo "done in $(( $(date +%s) - start )) s"
