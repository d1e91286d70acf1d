#!/usr/bin/env python3
"""Writes a random checkpoint with the exact shapes and file layout of Qwen/Qwen2-VL-2B-Instruct.

    /root/venv/bin/python benches/seed_task/make_checkpoint.py --out /work/ckpt/qwen2vl-2b-random

Speed benchmarks need the real shapes, not the real weights: this is what users download, minus
the training. Config, generation and preprocessor files are the published ones; the tokenizer
(real Qwen2 vocabulary) and chat template come from tests/fixtures/tiny-tied. Weights are bf16,
transformers' default init (std 0.02), seeded, saved under the published key names (`model.*`,
`visual.*`, no `lm_head`: tied) in two shards split at 4 GB as the published repo is
(visual + layers 0-23 in shard 1, the rest in shard 2). About 4.4 GB; needs ~5 GB of RAM.
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, Qwen2VLForConditionalGeneration

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
sys.path.insert(0, str(FIXTURES))
from make_fixtures import published_name  # noqa: E402  (the fixtures' own key renaming)

TINY = FIXTURES / "tiny-tied"
PUBLISHED_TOTAL_SIZE = 4417971200  # metadata.total_size in the published model.safetensors.index.json
MAX_SHARD = 4_000_000_000  # the published shards were cut at "4GB" (decimal)

# config.json of Qwen2-VL-2B-Instruct as published (flat keys, rope_scaling, in_chans).
CONFIG = {
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 1536,
    "initializer_range": 0.02,
    "intermediate_size": 8960,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "model_type": "qwen2_vl",
    "num_attention_heads": 12,
    "num_hidden_layers": 28,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.41.2",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
        "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 151936,
}

PREPROCESSOR = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2VLProcessor",
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    out = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    # Write config.json first and build the model from it, so the flat published form is what
    # transformers actually parses (a wrong key here would show up as a wrong shape below).
    (out / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    config = AutoConfig.from_pretrained(out)

    t = time.time()
    torch.manual_seed(args.seed)
    # Built directly in bf16: an f32 model would need 8.8 GB of RAM just to be cast down.
    model = Qwen2VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16).eval()
    print(f"initialised in {time.time() - t:.1f}s", flush=True)

    state = model.state_dict()
    # Tied: lm_head is the embedding matrix, and the published files carry no lm_head.
    assert state["lm_head.weight"].data_ptr() == state["model.language_model.embed_tokens.weight"].data_ptr()
    # Old transformers (which wrote the published files) kept `visual` before `model`: that order
    # decides which tensors land in which shard.
    named = [(published_name(k), v.contiguous()) for k, v in state.items() if k != "lm_head.weight"]
    named.sort(key=lambda kv: not kv[0].startswith("visual."))

    shards, size = [[]], 0
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        if size + nbytes > MAX_SHARD and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append((name, tensor))
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(dict(shard), out / fname, metadata={"format": "pt"})
        (out / fname).chmod(0o644)  # safetensors writes 0600; the other files are 0644
        for name, tensor in shard:
            weight_map[name] = fname
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    assert total == PUBLISHED_TOTAL_SIZE, f"total_size {total} != published {PUBLISHED_TOTAL_SIZE}"
    print(f"{len(weight_map)} tensors, {total} bytes in {len(shards)} shards", flush=True)

    shutil.copy(TINY / "generation_config.json", out)  # identical to the published one
    shutil.copy(TINY / "tokenizer.json", out)
    shutil.copy(TINY / "tokenizer_config.json", out)  # chat template inline, as published
    template = json.loads((TINY / "tokenizer_config.json").read_text())["chat_template"]
    (out / "chat_template.json").write_text(json.dumps({"chat_template": template}, indent=2) + "\n")
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
