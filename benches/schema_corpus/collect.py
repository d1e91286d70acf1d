"""Draws the real-world schema sample that `run.py` sends to the server.

    python benches/schema_corpus/collect.py DATA_DIR OUT_DIR [--per-dataset 30] [--seed 21]

DATA_DIR is JSONSchemaBench's `data/` folder (one subfolder per source: Github_easy,
Kubernetes, JsonSchemaStore, Snowplow, WashingtonPost, Glaiveai2K, ...; the public
`guidance-ai/jsonschemabench` repository holds it). The same arguments draw the same sample:
files are sorted by name, then `random.Random(seed)` picks `per-dataset` of each folder. Each
pick is copied to OUT_DIR as `<dataset>__<file>`, and OUT_DIR/manifest.json lists them.
"""

import argparse
import json
import pathlib
import random
import shutil

parser = argparse.ArgumentParser()
parser.add_argument("data_dir", type=pathlib.Path)
parser.add_argument("out_dir", type=pathlib.Path)
parser.add_argument("--per-dataset", type=int, default=30)
parser.add_argument("--seed", type=int, default=21)
args = parser.parse_args()

rng = random.Random(args.seed)
args.out_dir.mkdir(parents=True, exist_ok=True)
picked = []
for dataset in sorted(p for p in args.data_dir.iterdir() if p.is_dir()):
    files = sorted(dataset.glob("*.json"))
    for f in sorted(rng.sample(files, min(args.per_dataset, len(files)))):
        name = f"{dataset.name}__{f.name}"
        shutil.copyfile(f, args.out_dir / name)
        picked.append(name)
(args.out_dir / "manifest.json").write_text(json.dumps({"seed": args.seed, "per_dataset": args.per_dataset, "files": picked}, indent=1))
print(f"{len(picked)} schemas in {args.out_dir}")
