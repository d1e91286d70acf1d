#!/usr/bin/env python3
"""Times Hugging Face transformers on the seed task, the way the users' script runs it.

    /root/venv/bin/python benches/seed_task/reference.py --model /work/ckpt/qwen2vl-2b-random \\
        --images /work/ckpt/images --requests 3 --dtype bf16 --threads 2 --max-new-tokens 64

The architecture (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) comes from the checkpoint's config.json.

Per request: load the image (transformers.image_utils.load_image), render the chat template with
one image and the seed prompt, run the processor, greedy `generate` of exactly --max-new-tokens
tokens (min = max, so random weights cannot stop early at an EOS), decode, apply the seed
script's regex. One warm-up request on its own image comes first and is not counted; every
measured request uses a new image. Prints one JSON object on stdout; logs go to stderr.
"""

import argparse
import json
import os
import platform
import re
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoProcessor,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
)
from transformers.generation.streamers import BaseStreamer
from transformers.image_utils import load_image

PROMPT = "Please extract the Vehicle Sr No, Engine No, and Model from this image. Response only json format nothing else."
DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32}
MODELS = {
    "qwen2_vl": Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    "qwen3_vl": Qwen3VLForConditionalGeneration,
}


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def load_processor(model_dir: Path):
    """AutoProcessor, as the users' script does. transformers 5 also builds a video processor,
    which needs torchvision; without it, assemble the same processor from its image (PIL
    backend) and text parts, as tests/fixtures/make_fixtures.py does."""
    try:
        return AutoProcessor.from_pretrained(model_dir)
    except ImportError as e:
        if "orchvision" not in str(e):
            raise
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLProcessor, Qwen2VLProcessor, Qwen3VLProcessor
    from transformers.processing_utils import ProcessorMixin

    model_type = AutoConfig.from_pretrained(model_dir).model_type
    cls = {"qwen2_vl": Qwen2VLProcessor, "qwen2_5_vl": Qwen2_5_VLProcessor, "qwen3_vl": Qwen3VLProcessor}[model_type]
    log(f"torchvision missing: building {cls.__name__} without a video processor")
    ProcessorMixin.check_argument_for_proper_class = lambda self, name, arg: None
    tok = AutoTokenizer.from_pretrained(model_dir)
    # The processor's template (chat_template.json) wins over the tokenizer's, as in AutoProcessor.
    template_file = model_dir / "chat_template.json"
    template = json.loads(template_file.read_text())["chat_template"] if template_file.exists() else tok.chat_template
    return cls(image_processor=AutoImageProcessor.from_pretrained(model_dir), tokenizer=tok, chat_template=template)


class TokenClock(BaseStreamer):
    """generate() calls put() once with the prompt, then once per new token, right after it is chosen."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


class VisionTimer:
    """Wall time spent inside the vision tower's forward (patch embed, 32 blocks, merger)."""

    def __init__(self, module):
        self.total, self.calls, self._start = 0.0, 0, None
        module.register_forward_pre_hook(lambda *_: setattr(self, "_start", time.perf_counter()))
        module.register_forward_hook(self._stop)

    def _stop(self, *_):
        self.total += time.perf_counter() - self._start
        self.calls += 1

    def reset(self):
        self.total, self.calls = 0.0, 0


def vision_tower(model):
    # transformers 5: model.model.visual; 4.x before the refactor: model.visual.
    inner = getattr(model, "model", None)
    module = getattr(inner, "visual", None) or getattr(model, "visual", None)
    if module is None:
        raise SystemExit("cannot find the vision tower (model.model.visual / model.visual)")
    return module


def run_request(model, processor, image_path, max_new_tokens, vision):
    vision.reset()
    clock = TokenClock()
    start = time.perf_counter()
    image = load_image(str(image_path))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    # transformers 5 computes M-RoPE positions only when generate gets mm_token_type_ids; the
    # processor returns them, and without them image tokens silently get 1D positions.
    assert "mm_token_type_ids" in inputs, "processor returned no mm_token_type_ids"
    with torch.inference_mode():
        out = model.generate(**inputs, do_sample=False, temperature=None, top_k=None, top_p=None,
                             max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, streamer=clock)
    prompt_len = inputs["input_ids"].shape[1]
    generated = out[:, prompt_len:]
    answer = processor.batch_decode(generated, skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]
    match = re.search(r"({.*})", answer, re.DOTALL)  # the seed script's extraction
    end = time.perf_counter()

    n = generated.shape[1]
    first = clock.times[1]  # times[0] is the prompt being handed to the streamer
    assert len(clock.times) == n + 1 and vision.calls == 1, (len(clock.times), n, vision.calls)
    return {
        "image": image_path.name,
        "vision_s": vision.total,
        "ttft_s": first - start,
        "decode_tok_s": (n - 1) / (end - first) if n > 1 else None,
        "e2e_s": end - start,
        "prompt_tokens": prompt_len,
        "visual_tokens": int((inputs["input_ids"] == model.config.image_token_id).sum()),
        "generated_tokens": n,
        "json_found": match is not None,
        "text": answer,
    }


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--images", required=True, type=Path)
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--dtype", choices=DTYPES, default="bf16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()

    images = sorted(args.images.glob("img-*.jpg"))
    if len(images) < args.requests + 1:
        raise SystemExit(f"need {args.requests + 1} images (one for warm-up), found {len(images)} in {args.images}")
    torch.set_num_threads(args.threads)

    t = time.perf_counter()
    model_type = AutoConfig.from_pretrained(args.model).model_type
    if model_type not in MODELS:
        raise SystemExit(f"{args.model}: model_type {model_type!r}, expected one of {sorted(MODELS)}")
    model = MODELS[model_type].from_pretrained(args.model, torch_dtype=DTYPES[args.dtype])
    processor = load_processor(args.model)
    load_s = time.perf_counter() - t
    log(f"loaded in {load_s:.1f}s ({model.dtype}, attention {model.config._attn_implementation})")
    vision = VisionTimer(vision_tower(model))

    warm = run_request(model, processor, images[0], args.max_new_tokens, vision)
    log(f"warm-up {warm['image']}: e2e {warm['e2e_s']:.1f}s, ttft {warm['ttft_s']:.1f}s")
    runs = []
    for path in images[1:args.requests + 1]:
        r = run_request(model, processor, path, args.max_new_tokens, vision)
        log(f"{r['image']}: vision {r['vision_s']:.2f}s ttft {r['ttft_s']:.2f}s decode {r['decode_tok_s']:.2f} tok/s "
            f"e2e {r['e2e_s']:.2f}s prompt {r['prompt_tokens']} visual {r['visual_tokens']} "
            f"generated {r['generated_tokens']} json {r['json_found']}")
        runs.append(r)

    def median(key):
        values = [r[key] for r in runs]
        # Token counts stay integers; timings take the true median.
        return statistics.median_low(values) if isinstance(values[0], int) else statistics.median(values)

    result = {
        "system": {
            "cpu": cpu_name(), "cores": os.cpu_count(), "threads": args.threads,
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "attention": model.config._attn_implementation,
            "image_processor": type(processor.image_processor).__name__,
        },
        "model": str(args.model), "architecture": model_type, "dtype": args.dtype,
        "max_new_tokens": args.max_new_tokens,
        # generate() applies the checkpoint's generation_config.json; Qwen2.5-VL's sets 1.05.
        "repetition_penalty": model.generation_config.repetition_penalty,
        "requests": len(runs), "load_s": load_s,
        **{k: median(k) for k in ("vision_s", "ttft_s", "decode_tok_s", "e2e_s",
                                  "prompt_tokens", "visual_tokens", "generated_tokens")},
        # ru_maxrss is in KiB on Linux.
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2,
        "warmup": {k: v for k, v in warm.items() if k != "text"},
        "runs": runs,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
