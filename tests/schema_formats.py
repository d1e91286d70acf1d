"""Checks answers against a JSON Schema with Python's `jsonschema`, formats asserted: a
validator written by someone else than the server's grammar and its check.

    python tests/schema_formats.py < {"schema": {...}, "answers": [...], "formats": [...]}

Fails unless the format checker knows every format in `formats` (the format packages of
`jsonschema[format-nongpl]` are installed) and every answer validates. Prints one line per
answer that does not, then `N passed, N failed`.
"""

import json
import sys

import jsonschema

job = json.load(sys.stdin)
checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
unknown = [f for f in job["formats"] if f not in checker.checkers]
if unknown:
    sys.exit(f"jsonschema cannot check {unknown}: install jsonschema[format-nongpl]")
validator = jsonschema.Draft202012Validator(job["schema"], format_checker=checker)
failed = 0
for answer in job["answers"]:
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(answer)]
    if errors:
        failed += 1
        print(f"invalid {json.dumps(answer)}: {errors}")
print(f"{len(job['answers']) - failed} passed, {failed} failed")
sys.exit(1 if failed else 0)
