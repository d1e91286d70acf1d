#!/usr/bin/env python3
"""Writes a random checkpoint with the exact shapes and file layout of a published Qwen-VL model.

    /root/venv/bin/python benches/seed_task/make_checkpoint.py --out /work/ckpt/qwen2vl-2b-random
    /root/venv/bin/python benches/seed_task/make_checkpoint.py --family qwen2_5_vl --out /work/ckpt/qwen25vl-3b-random
    /root/venv/bin/python benches/seed_task/make_checkpoint.py --family qwen3_vl --out /work/ckpt/qwen3vl-2b-random
    # what it would write (tensor count, bytes, shards), on the meta device: no memory, no files
    /root/venv/bin/python benches/seed_task/make_checkpoint.py --family qwen3_vl --out /tmp/x --dry-run
    # the same layout with tiny sizes, to check the script and the loaders end to end
    /root/venv/bin/python benches/seed_task/make_checkpoint.py --family qwen3_vl --out /tmp/q3-tiny --tiny

Speed benchmarks need the real shapes, not the real weights: this is what users download, minus
the training. Config, generation and preprocessor files are the published ones; the tokenizer
(real Qwen2 vocabulary) and chat template come from the family's tiny fixture under
tests/fixtures. Weights are bf16, transformers' default init (std 0.02), seeded, saved under the
published key names:

  qwen2_vl    Qwen/Qwen2-VL-2B-Instruct: `model.*`/`visual.*`, tied (no `lm_head`), two shards cut
              at 4 GB with `visual` first (as the published repo is). 4.4 GB; ~5 GB of RAM.
  qwen2_5_vl  Qwen/Qwen2.5-VL-3B-Instruct: `model.*`/`visual.*`, tied, two shards cut at 4 GB with
              `visual` first. About 7.5 GB; ~8.5 GB of RAM.
  qwen3_vl    Qwen/Qwen3-VL-2B-Instruct: `model.language_model.*`/`model.visual.*`, tied, one
              model.safetensors. About 4.3 GB; ~5 GB of RAM.
"""

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
)

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
sys.path.insert(0, str(FIXTURES))
# The fixtures' own key renaming and published generation files.
from make_fixtures import (  # noqa: E402
    QWEN2_5_VL_GENERATION_CONFIG,
    QWEN3_VL_GENERATION_CONFIG,
    QWEN3_VL_VIDEO_PREPROCESSOR,
    published_name,
)

MAX_SHARD = 4_000_000_000  # the published Qwen2-VL/Qwen2.5-VL shards were cut at "4GB" (decimal)

# config.json of Qwen2-VL-2B-Instruct as published (flat keys, rope_scaling, in_chans).
QWEN2_VL_2B = {
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

# config.json of Qwen2.5-VL-3B-Instruct as published.
QWEN2_5_VL_3B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 128000,
    "max_window_layers": 70,
    "model_type": "qwen2_5_vl",
    "num_attention_heads": 16,
    "num_hidden_layers": 36,
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
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 2048,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 151936,
}

# config.json of Qwen3-VL-2B-Instruct as published.
QWEN3_VL_2B = {
    "architectures": ["Qwen3VLForConditionalGeneration"],
    "image_token_id": 151655,
    "model_type": "qwen3_vl",
    "text_config": {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "dtype": "bfloat16",
        "eos_token_id": 151645,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "initializer_range": 0.02,
        "intermediate_size": 6144,
        "max_position_embeddings": 262144,
        "model_type": "qwen3_vl_text",
        "num_attention_heads": 16,
        "num_hidden_layers": 28,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
        "rope_theta": 5000000,
        "tie_word_embeddings": True,
        "use_cache": True,
        "vocab_size": 151936,
    },
    "tie_word_embeddings": True,
    "transformers_version": "4.57.0.dev0",
    "video_token_id": 151656,
    "vision_config": {
        "deepstack_visual_indexes": [5, 11, 17],
        "depth": 24,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 1024,
        "in_channels": 3,
        "initializer_range": 0.02,
        "intermediate_size": 4096,
        "model_type": "qwen3_vl",
        "num_heads": 16,
        "num_position_embeddings": 2304,
        "out_hidden_size": 2048,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
    "vision_end_token_id": 151653,
    "vision_start_token_id": 151652,
}

QWEN2_VL_PREPROCESSOR = {
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
QWEN2_5_VL_PREPROCESSOR = {**QWEN2_VL_PREPROCESSOR, "processor_class": "Qwen2_5_VLProcessor"}
QWEN3_VL_PREPROCESSOR = {
    "size": {"longest_edge": 16777216, "shortest_edge": 65536},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor",
    "image_processor_type": "Qwen2VLImageProcessorFast",
}

FAMILIES = {
    "qwen2_vl": dict(
        config=QWEN2_VL_2B, model_class=Qwen2VLForConditionalGeneration, fixture="tiny-tied",
        preprocessor=QWEN2_VL_PREPROCESSOR, generation=None,  # tiny-tied's is the published one
        rename=published_name, max_shard=MAX_SHARD,
        total_size=4417971200,  # metadata.total_size in the published model.safetensors.index.json
    ),
    "qwen2_5_vl": dict(
        config=QWEN2_5_VL_3B, model_class=Qwen2_5_VLForConditionalGeneration, fixture="tiny-qwen2_5_vl",
        preprocessor=QWEN2_5_VL_PREPROCESSOR, generation=QWEN2_5_VL_GENERATION_CONFIG,
        rename=published_name, max_shard=MAX_SHARD, total_size=None,
    ),
    "qwen3_vl": dict(
        config=QWEN3_VL_2B, model_class=Qwen3VLForConditionalGeneration, fixture="tiny-qwen3_vl",
        preprocessor=QWEN3_VL_PREPROCESSOR, generation=QWEN3_VL_GENERATION_CONFIG,
        rename=lambda k: k, max_shard=None, total_size=None,
        extra={"video_preprocessor_config.json": QWEN3_VL_VIDEO_PREPROCESSOR},
    ),
}


def tiny(config: dict) -> dict:
    """The same layout and config keys with small sizes: for checking the script, not for timing."""
    c = copy.deepcopy(config)
    text = c.get("text_config", c)
    text.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2)
    if "head_dim" in text:
        text["head_dim"] = 32
    rope = text["rope_scaling"]
    rope["mrope_section"] = [8, 4, 4] if rope.get("mrope_interleaved") else [4, 2, 2]
    v = c["vision_config"]
    v.update(depth=4, num_heads=2)
    if "embed_dim" in v:  # Qwen2-VL: embed_dim is the tower, hidden_size the language model's
        v.update(embed_dim=32, hidden_size=64)
    else:
        v.update(hidden_size=32, intermediate_size=64, out_hidden_size=64)
    if "fullatt_block_indexes" in v:
        v["fullatt_block_indexes"] = [1, 3]
    if "deepstack_visual_indexes" in v:
        v["deepstack_visual_indexes"] = [0, 2]
    return c


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=sorted(FAMILIES), default="qwen2_vl")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="small sizes, same layout (a check of the script)")
    ap.add_argument("--dry-run", action="store_true", help="report tensors, bytes and shards; write nothing")
    args = ap.parse_args()
    family = FAMILIES[args.family]
    config_json = tiny(family["config"]) if args.tiny else family["config"]

    out = args.out
    if not args.dry_run:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        # Write config.json first and build the model from it, so the published form is what
        # transformers actually parses (a wrong key here would show up as a wrong shape below).
        (out / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
        config = AutoConfig.from_pretrained(out)
    else:
        config = AutoConfig.for_model(**copy.deepcopy(config_json))

    t = time.time()
    torch.manual_seed(args.seed)
    # Built directly in bf16: an f32 model would need twice the RAM just to be cast down.
    if args.dry_run:
        with torch.device("meta"):
            model = family["model_class"]._from_config(config, dtype=torch.bfloat16).eval()
    else:
        model = family["model_class"]._from_config(config, dtype=torch.bfloat16).eval()
        print(f"initialised in {time.time() - t:.1f}s", flush=True)

    state = model.state_dict()
    # Tied: lm_head is the embedding matrix, and the published files carry no lm_head.
    assert state["lm_head.weight"] is state["model.language_model.embed_tokens.weight"] or (
        state["lm_head.weight"].data_ptr() == state["model.language_model.embed_tokens.weight"].data_ptr())
    named = [(family["rename"](k), v) for k, v in state.items() if k != "lm_head.weight"]
    # Old transformers (which wrote the Qwen2-VL/Qwen2.5-VL files) kept `visual` before `model`:
    # that order decides which tensors land in which shard.
    named.sort(key=lambda kv: not kv[0].startswith("visual."))

    shards, size = [[]], 0
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        if family["max_shard"] and size + nbytes > family["max_shard"] and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append((name, tensor))
        size += nbytes
    total = sum(t.numel() * t.element_size() for _, t in named)
    if family["total_size"] and not args.tiny:
        assert total == family["total_size"], f"total_size {total} != published {family['total_size']}"
    files = (["model.safetensors"] if len(shards) == 1 and not family["max_shard"]
             else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    print(f"{args.family}{' (tiny)' if args.tiny else ''}: {len(named)} tensors, {total} bytes "
          f"({total / 2**30:.2f} GiB), {sum(t.numel() for _, t in named)} parameters, files {files}, "
          f"shard bytes {[sum(t.numel() * t.element_size() for _, t in s) for s in shards]}", flush=True)
    if args.dry_run:
        return

    weight_map = {}
    for fname, shard in zip(files, shards):
        save_file({k: v.contiguous() for k, v in shard}, out / fname, metadata={"format": "pt"})
        (out / fname).chmod(0o644)  # safetensors writes 0600; the other files are 0644
        for name, _ in shard:
            weight_map[name] = fname
    if files != ["model.safetensors"]:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    fixture = FIXTURES / family["fixture"]
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.json"):
        if (fixture / name).exists():
            shutil.copy(fixture / name, out)
    if not (out / "chat_template.json").exists():  # Qwen2-VL publishes the template in both places
        template = json.loads((fixture / "tokenizer_config.json").read_text())["chat_template"]
        (out / "chat_template.json").write_text(json.dumps({"chat_template": template}, indent=2) + "\n")
    if family["generation"] is None:
        shutil.copy(fixture / "generation_config.json", out)
    else:
        (out / "generation_config.json").write_text(json.dumps(family["generation"], indent=2) + "\n")
    (out / "preprocessor_config.json").write_text(json.dumps(family["preprocessor"], indent=2) + "\n")
    for name, content in family.get("extra", {}).items():
        (out / name).write_text(json.dumps(content, indent=2) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
