#!/usr/bin/env bash
# The seed task, transformers and qwen-ocr one after the other in one session, then a table.
#   benches/seed_task/side_by_side.sh CHECKPOINT_DIR IMAGES_DIR [PYTHON]
# Env: REQUESTS (3), TOKENS (64), QUANTS ("q8_0"), REFERENCE_DTYPES ("bf16"), MAX_ISAS ("native";
# e.g. "native avx2 baseline" also times the same build as a CPU without AVX-512 or AVX2 runs it),
# OUT (a folder to keep the raw JSON in; a temporary one otherwise); LLAMA_CPP_CLI, LLAMA_CPP_MODEL and
# LLAMA_CPP_MMPROJ (all three: llama.cpp's llama-mtmd-cli on GGUF files of the same checkpoint, see
# llama_cpp.py) add llama.cpp to the run.
set -euo pipefail
model=$1 images=$2 python=${3:-python3}
cd "$(dirname "$0")/../.."
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"
cargo bench -q --bench seed_task --no-run # built first, so no build runs beside a timed system
for dtype in ${REFERENCE_DTYPES:-bf16}; do
    "$python" benches/seed_task/reference.py --model "$model" --images "$images" --requests "${REQUESTS:-3}" \
        --dtype "$dtype" --threads 2 --max-new-tokens "${TOKENS:-64}" > "$out/transformers-$dtype.json"
done
if [ -n "${LLAMA_CPP_CLI:-}" ]; then
    "$python" benches/seed_task/llama_cpp.py --cli "$LLAMA_CPP_CLI" --model "$LLAMA_CPP_MODEL" --mmproj "$LLAMA_CPP_MMPROJ" \
        --images "$images" --requests "${REQUESTS:-3}" --threads 2 --max-new-tokens "${TOKENS:-64}" > "$out/llama-cpp.json"
fi
for quant in ${QUANTS:-q8_0}; do
    for isa in ${MAX_ISAS:-native}; do
        ceiling=()
        [ "$isa" = native ] || ceiling=("QWEN_OCR_MAX_ISA=$isa")
        env "${ceiling[@]}" QWEN_OCR_BENCH_MODEL="$model" QWEN_OCR_BENCH_IMAGES="$images" QWEN_OCR_BENCH_QUANT="$quant" \
            QWEN_OCR_BENCH_REQUESTS="${REQUESTS:-3}" QWEN_OCR_BENCH_TOKENS="${TOKENS:-64}" \
            cargo bench -q --bench seed_task | tail -n 1 > "$out/qwen-ocr-$quant-$isa.json"
    done
done
"$python" benches/seed_task/table.py "$out"/transformers-*.json "$out"/qwen-ocr-*.json $(ls "$out"/llama-cpp.json 2>/dev/null)
