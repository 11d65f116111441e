#!/usr/bin/env python3
"""Validate Kubernetes manifests offline.

Every YAML document in the files and directories given on the command line is checked:

* built-in kinds against the Kubernetes OpenAPI schemas shipped by `kubernetes-validate`
  (a fixed Kubernetes version, strict: unknown fields are errors);
* custom resources against the `openAPIV3Schema` of the CustomResourceDefinitions passed
  with `--crd <file>` (each file may hold several CRDs). `x-kubernetes-*` keys are ignored,
  and an object schema that lists `properties` rejects unknown fields, as the API server's
  strict field validation does (unless it says `x-kubernetes-preserve-unknown-fields`).

A document of a kind that is neither built in nor defined by a `--crd` file fails.

Usage: validate_manifests.py [--k8s-version 1.33] [--crd FILE]... PATH...
Exit status: 0 when every document is valid, 1 otherwise.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

DEFAULT_K8S_VERSION = "1.33"


def load_documents(path: Path):
    with path.open(encoding="utf-8") as f:
        for index, doc in enumerate(yaml.safe_load_all(f)):
            if doc is not None:
                yield index, doc


def yaml_files(paths):
    for p in paths:
        p = Path(p)
        if p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "target")
                for name in sorted(files):
                    if name.endswith((".yaml", ".yml")):
                        yield Path(root) / name
        elif p.is_file():
            yield p
        else:
            raise SystemExit(f"error: {p} does not exist")


def to_jsonschema(schema, root=False):
    """An OpenAPI v3 (structural) schema as a JSON schema jsonschema can check strictly."""
    if isinstance(schema, list):
        return [to_jsonschema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key.startswith("x-kubernetes-"):
            continue
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {k: to_jsonschema(v) for k, v in value.items()}
        elif key == "nullable":
            continue
        else:
            out[key] = to_jsonschema(value)
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if schema.get("x-kubernetes-int-or-string"):
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    preserve = schema.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    if root:
        props = out.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props["metadata"] = {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string", "minLength": 1}},
        }
    return out


def load_crds(files):
    """(apiVersion, kind) -> (JSON schema, where it came from)"""
    crds = {}
    for f in files:
        path = Path(f)
        for _, doc in load_documents(path):
            if doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc.get("spec", {})
            group = spec.get("group")
            kind = spec.get("names", {}).get("kind")
            for version in spec.get("versions", []):
                schema = version.get("schema", {}).get("openAPIV3Schema")
                if schema is None:
                    continue
                crds[(f"{group}/{version['name']}", kind)] = (
                    to_jsonschema(copy.deepcopy(schema), root=True),
                    f"{path} ({doc.get('metadata', {}).get('name')})",
                )
    if files and not crds:
        raise SystemExit(f"error: no CustomResourceDefinition in {', '.join(files)}")
    return crds


def describe(error):
    where = "/".join(str(p) for p in error.absolute_path) or "(root)"
    return f"at {where}: {error.message}"


def validate_doc(doc, crds, k8s_version):
    """Returns None when valid, else a message."""
    if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
        return "not a Kubernetes object (apiVersion and kind are required)"
    key = (doc["apiVersion"], doc["kind"])
    if key in crds:
        schema, _ = crds[key]
        validator = jsonschema.Draft202012Validator(schema)
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        if errors:
            return "; ".join(describe(e) for e in errors[:5])
        return None
    try:
        kubernetes_validate.validate(doc, k8s_version, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return (
            f"unknown kind {doc['kind']} ({doc['apiVersion']}): not built into Kubernetes "
            f"{k8s_version} and no --crd file defines it"
        )
    except kubernetes_validate.ValidationError as e:
        return str(e.message) + (f" at {'/'.join(map(str, e.path))}" if e.path else "")
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--crd", action="append", default=[], help="a file of CustomResourceDefinitions")
    parser.add_argument("--k8s-version", default=DEFAULT_K8S_VERSION)
    parser.add_argument("paths", nargs="+", help="files or directories of YAML manifests")
    args = parser.parse_args(argv)

    crds = load_crds(args.crd)
    failures = 0
    count = 0
    files = list(yaml_files(args.paths))
    if not files:
        raise SystemExit(f"error: no YAML file under {' '.join(args.paths)}")
    for path in files:
        try:
            docs = list(load_documents(path))
        except yaml.YAMLError as e:
            print(f"FAIL {path}: not valid YAML: {e}")
            failures += 1
            continue
        for index, doc in docs:
            count += 1
            name = doc.get("metadata", {}).get("name", "?") if isinstance(doc, dict) else "?"
            kind = doc.get("kind", "?") if isinstance(doc, dict) else "?"
            problem = validate_doc(doc, crds, args.k8s_version)
            if problem:
                failures += 1
                print(f"FAIL {path}#{index} {kind}/{name}: {problem}")
    print(f"validate-manifests: {count - failures} passed, {failures} failed "
          f"({len(files)} files, Kubernetes {args.k8s_version})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
