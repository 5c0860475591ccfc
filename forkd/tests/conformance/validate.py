"""Check documents against docs/cli-schema.json.

    python3 validate.py SCHEMA < lines

Each input line is {"def": NAME, "doc": VALUE}: VALUE must match
$defs/NAME. Prints `valid NAME` per line, or the errors, and exits 1 if
any did not match. Run by forkd/tests/cli.rs.
"""

import json
import sys

import jsonschema


def main():
    with open(sys.argv[1]) as f:
        schema = json.load(f)
    cls = jsonschema.Draft202012Validator
    cls.check_schema(schema)
    bad = 0
    for line in sys.stdin:
        if not line.strip():
            continue
        item = json.loads(line)
        v = cls({"$ref": f"#/$defs/{item['def']}", "$defs": schema["$defs"]})
        errors = list(v.iter_errors(item["doc"]))
        if errors:
            bad += 1
            for e in errors:
                print(f"invalid {item['def']}: {'/'.join(map(str, e.absolute_path))}: {e.message}")
        else:
            print(f"valid {item['def']}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
