"""Sends each schema of a corpus once through `/v1/chat/completions` with
`response_format: json_schema` and checks every answer with Python's `jsonschema`.

    python benches/schema_corpus/run.py BASE_URL CORPUS_DIR [--strict] [--max-tokens 256] [--out FILE]

A one-off measurement, not a test: against `qwen-ocr serve` on any checkpoint (the tiny one
writes random JSON within the grammar, which is what a validity check wants). Needs
`jsonschema[format-nongpl]` so that formats are asserted (the script refuses to run without
the format packages). Prints a summary: how many schemas were accepted, the refusal reasons
most often given, the 5xx count, and for every answer that ended with `stop` whether it parses
and validates (formats included) and whether that agrees with the server's `schema_valid`.
"""

import argparse
import collections
import json
import pathlib
import re
import sys
import time
import urllib.error
import urllib.request

import jsonschema
import jsonschema.validators

parser = argparse.ArgumentParser()
parser.add_argument("base_url")
parser.add_argument("corpus", type=pathlib.Path)
parser.add_argument("--strict", action="store_true")
parser.add_argument("--max-tokens", type=int, default=256)
parser.add_argument("--out", type=pathlib.Path, help="per-schema results as JSON lines")
args = parser.parse_args()

REQUIRED_FORMATS = ["date-time", "date", "time", "email", "hostname", "ipv4", "ipv6", "uri", "uri-reference", "uuid", "duration"]
missing = [f for f in REQUIRED_FORMATS if f not in jsonschema.Draft202012Validator.FORMAT_CHECKER.checkers]
if missing:
    sys.exit(f"jsonschema cannot check {missing}: pip install 'jsonschema[format-nongpl]'")


def post(body):
    request = urllib.request.Request(
        args.base_url + "/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), dict(e.headers)


def python_errors(schema, answer):
    """What Python's jsonschema finds wrong with the answer (formats asserted)."""
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    validator = cls(schema, format_checker=cls.FORMAT_CHECKER)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in validator.iter_errors(answer)]


def reason(message):
    """A refusal message with its paths and names blanked, so that alike ones count together."""
    message = re.sub(r"`[^`]*`", "`_`", message)
    message = re.sub(r"(at|in) /[^ ;,)]*", r"\1 /_", message)
    message = re.sub(r"\"[^\"]*\"|'[^']*'", "'_'", message)
    return re.sub(r"\d+", "N", message)[:140]


files = sorted(p for p in args.corpus.glob("*.json") if p.name != "manifest.json")
rows = []
for i, path in enumerate(files):
    schema = json.loads(path.read_text())
    body = {
        "model": "base",
        "messages": [{"role": "user", "content": "Write one JSON value that fits the schema."}],
        "max_tokens": args.max_tokens,
        "temperature": 1.0,
        "seed": i,
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": args.strict}},
    }
    started = time.monotonic()
    status, reply, headers = post(body)
    row = {"file": path.name, "status": status, "seconds": round(time.monotonic() - started, 3)}
    if status == 200:
        choice = reply["choices"][0]
        row.update(finish=choice["finish_reason"], relaxed=sorted({r["keyword"] for r in reply.get("schema_relaxed", [])}))
        row.update(server_valid=reply.get("schema_valid"), header=headers.get("x-qwen-ocr-schema-relaxed"))
        if choice["finish_reason"] == "stop":
            try:
                answer = json.loads(choice["message"]["content"])
                row["python_errors"] = python_errors(schema, answer)
            except json.JSONDecodeError as e:
                row["python_errors"] = [f"not JSON: {e}"]
            except Exception as e:  # a reference Python cannot resolve, a pattern it cannot compile
                row["python_unchecked"] = f"{type(e).__name__}: {str(e)[:200]}"
    else:
        row["error"] = reply.get("error", {}).get("message", "")
    rows.append(row)
    print(json.dumps(row), file=sys.stderr)

if args.out:
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
accepted = [r for r in rows if r["status"] == 200]
refused = [r for r in rows if r["status"] == 400]
stop = [r for r in accepted if r["finish"] == "stop"]
checked = [r for r in stop if "python_errors" in r]
summary = {
    "schemas": len(rows),
    "strict": args.strict,
    "accepted": len(accepted),
    "acceptance_rate": round(len(accepted) / len(rows), 4) if rows else None,
    "refused_400": len(refused),
    "status_5xx": sum(r["status"] >= 500 for r in rows),
    "other_status": sorted({r["status"] for r in rows} - {200, 400}),
    "top_refusals": collections.Counter(reason(r["error"]) for r in refused).most_common(10),
    "finished_stop": len(stop),
    "finished_length": sum(r["finish"] == "length" for r in accepted),
    "stop_checked_by_python": len(checked),
    "stop_valid_by_python": sum(not r["python_errors"] for r in checked),
    "stop_invalid_by_python": [r for r in checked if r["python_errors"]],
    "stop_python_could_not_check": [(r["file"], r["python_unchecked"]) for r in stop if "python_unchecked" in r],
    "server_valid_disagrees": [r["file"] for r in checked if r["server_valid"] != (not r["python_errors"])],
    "relaxed_keywords": collections.Counter(k for r in accepted for k in r["relaxed"]).most_common(),
    "accepted_with_relaxations": sum(bool(r["relaxed"]) for r in accepted),
    "seconds_max": max((r["seconds"] for r in rows), default=None),
    "seconds_max_refused": max((r["seconds"] for r in refused), default=None),
}
print(json.dumps(summary, indent=1))
