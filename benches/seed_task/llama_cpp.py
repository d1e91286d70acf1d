#!/usr/bin/env python3
"""Times llama.cpp's `llama-mtmd-cli` on the seed task, in the JSON that table.py reads.

    python benches/seed_task/llama_cpp.py --cli /path/to/llama-mtmd-cli \\
        --model qwen2vl-2b-q8_0.gguf --mmproj mmproj-qwen2vl-2b-f16.gguf \\
        --images /work/ckpt/images --requests 3 --threads 2 --max-new-tokens 64

The GGUF files come from llama.cpp's own `convert_hf_to_gguf.py` on the same checkpoint as the
other systems (`--outtype q8_0`, and `--mmproj --outtype f16` for the vision tower). Build
llama.cpp with clang (gcc 12's AMX intrinsics crash it) and `-DGGML_NATIVE=ON`, so its AMX and
AVX-512 paths are on where the CPU has them.

Per request: one `llama-mtmd-cli` process with one image, the seed prompt in the checkpoint's
chat template, greedy decoding of exactly --max-new-tokens tokens (`--ignore-eos`, as the other
systems force the full count on random weights). llama.cpp loads the model in every process, so
the times come from its own log rather than the clock: vision = the image's encoding; time to
first token = the prompt's evaluation (which spans the encoding, the image's and the text's
decoding); decode = its eval rate; end to end = those plus the decode. One warm-up request on its own image comes first and is
not counted. Peak RSS is the largest of the processes'.
"""

import argparse
import json
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "Please extract the Vehicle Sr No, Engine No, and Model from this image. Response only json format nothing else."

ENCODED = re.compile(r"(?:slice encoded|mtmd batch encoding done) in (\d+) ms")
PROMPT_EVAL = re.compile(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens")
EVAL = re.compile(r"llama_perf_context_print:\s+eval time =\s*([\d.]+) ms /\s*(\d+) runs")
LOAD = re.compile(r"load time =\s*([\d.]+) ms")


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def run_request(args, image: Path):
    cmd = [str(args.cli), "-m", str(args.model), "--mmproj", str(args.mmproj), "--image", str(image),
           "-p", PROMPT, "-n", str(args.max_new_tokens), "--temp", "0", "--ignore-eos",
           "-t", str(args.threads), "-tb", str(args.threads), "-lv", "4"]  # -lv 4: its timings
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = child.communicate()
    wall = time.perf_counter() - start
    if child.returncode != 0:
        raise SystemExit(f"llama-mtmd-cli failed ({child.returncode}):\n{stderr[-4000:]}")
    found = lambda pattern: pattern.findall(stderr)
    encoded = found(ENCODED)
    (prompt_ms, prompt_tokens), = found(PROMPT_EVAL)
    (eval_ms, eval_runs), = found(EVAL)
    (load_ms,) = found(LOAD)
    vision_s = sum(int(ms) for ms in encoded) / 1000
    # The prompt's evaluation spans the text before the image, the image's encoding and
    # decoding, and the text after it (the log's own timestamps agree).
    ttft_s = float(prompt_ms) / 1000
    return {
        "image": image.name,
        "vision_s": vision_s,
        "ttft_s": ttft_s,
        "decode_tok_s": int(eval_runs) / (float(eval_ms) / 1000),
        "e2e_s": ttft_s + float(eval_ms) / 1000,
        "prompt_tokens": int(prompt_tokens),
        # The first token comes from the prompt's evaluation, each later one from an eval run.
        "generated_tokens": int(eval_runs) + 1,
        "load_s": float(load_ms) / 1000,
        "wall_s": wall,
        "text": stdout.strip()[-400:],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cli", required=True, type=Path)
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--mmproj", required=True, type=Path)
    ap.add_argument("--images", required=True, type=Path)
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--label", default="Q8_0 text + f16 projector")
    args = ap.parse_args()

    images = sorted(args.images.glob("img-*.jpg"))
    if len(images) < args.requests + 1:
        raise SystemExit(f"need {args.requests + 1} images (one for warm-up), found {len(images)} in {args.images}")
    warm = run_request(args, images[0])
    log(f"warm-up {warm['image']}: e2e {warm['e2e_s']:.1f}s, ttft {warm['ttft_s']:.1f}s, wall {warm['wall_s']:.1f}s")
    runs = []
    for path in images[1:args.requests + 1]:
        r = run_request(args, path)
        log(f"{r['image']}: vision {r['vision_s']:.2f}s ttft {r['ttft_s']:.2f}s decode {r['decode_tok_s']:.2f} tok/s "
            f"e2e {r['e2e_s']:.2f}s (wall {r['wall_s']:.2f}s, load {r['load_s']:.2f}s) prompt {r['prompt_tokens']} "
            f"generated {r['generated_tokens']}")
        runs.append(r)

    median = lambda key: statistics.median(r[key] for r in runs)
    print(json.dumps({
        "system": "llama.cpp", "label": args.label, "cli": str(args.cli), "model": str(args.model),
        "mmproj": str(args.mmproj), "threads": args.threads, "max_new_tokens": args.max_new_tokens,
        "requests": len(runs), "load_s": median("load_s"),
        **{k: median(k) for k in ("vision_s", "ttft_s", "decode_tok_s", "e2e_s")},
        "prompt_tokens": statistics.median_low(r["prompt_tokens"] for r in runs),
        "generated_tokens": statistics.median_low(r["generated_tokens"] for r in runs),
        # The largest ru_maxrss of the children reaped so far (KiB on Linux).
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 ** 2,
        "warmup": {k: v for k, v in warm.items() if k != "text"},
        "runs": runs,
    }, indent=1))


if __name__ == "__main__":
    main()
