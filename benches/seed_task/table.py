"""Markdown table of seed-task reports (the JSON of reference.py, llama_cpp.py and the seed_task
bench), with each system's ratio to the first report."""
import json
import sys

rows = [json.load(open(path)) for path in sys.argv[1:]]


def name(r):
    if r.get("system") == "qwen-ocr":
        label = f"qwen-ocr `--quant {r['quant']}`" if r["quant"] else f"qwen-ocr `--dtype {r['dtype']}` (a build without `--quant`)"
        return " ".join([label] + [f"`{e}`" for e in r.get("env", [])])
    if r.get("system") == "llama.cpp":
        return f"llama.cpp `llama-mtmd-cli`, {r['label']}"
    return f"transformers {r['dtype']}"


def seconds(value):
    return "–" if value is None else f"{value:.1f} s"


base = rows[0]
print("| system | load | vision | time to first token | decode | end to end | peak RSS |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    speed = lambda key, higher=False: (r[key] / base[key]) if higher else (base[key] / r[key])
    print(
        f"| {name(r)} | {r['load_s']:.1f} s | {seconds(r['vision_s'])} | {r['ttft_s']:.1f} s ({speed('ttft_s'):.2f}x) "
        f"| {r['decode_tok_s']:.1f} tok/s ({speed('decode_tok_s', True):.2f}x) | {r['e2e_s']:.1f} s ({speed('e2e_s'):.2f}x) "
        f"| {r['peak_rss_gib']:.2f} GiB |"
    )
