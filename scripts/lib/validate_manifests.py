"""Validate rendered Kubernetes manifests offline, every object, strictly.

    python scripts/lib/validate_manifests.py --kube-version 1.27.0 --kube-version 1.37.0 \
        --crd deploy/schemas/servicemonitor.crd.yaml rendered.yaml...

Built-in kinds are checked with kubernetes-validate (the Kubernetes OpenAPI schemas as JSON
Schema, bundled in the package, strict: an unknown field is an error) for each --kube-version.
Kinds defined by a --crd file (e.g. the Prometheus Operator's ServiceMonitor) are checked against
that CRD's openAPIV3Schema, made strict the same way. An object of a kind with no schema is an
error, never a skip. Exit status 1 when anything fails; one line per object either way.
"""
from __future__ import annotations

import argparse
import copy
import sys
from typing import Any

import jsonschema
import kubernetes_validate
import yaml


def strict(schema: Any) -> Any:
    """A CRD's structural schema with additionalProperties: false wherever it lists properties and
    does not itself allow unknown fields (what kubeconform's openapi2jsonschema -strict does)."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        if out.get("x-kubernetes-int-or-string") and "type" not in out and "anyOf" not in out:
            out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def load_crds(paths: list[str]) -> dict[tuple[str, str], Any]:
    """(apiVersion, kind) -> JSON Schema, for every served version of every CRD in the files."""
    out: dict[tuple[str, str], Any] = {}
    for path in paths:
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if not doc or doc.get("kind") != "CustomResourceDefinition":
                    continue
                group, kind = doc["spec"]["group"], doc["spec"]["names"]["kind"]
                for v in doc["spec"]["versions"]:
                    if v.get("served", True):
                        out[(f"{group}/{v['name']}", kind)] = strict(copy.deepcopy(v["schema"]["openAPIV3Schema"]))
    return out


def name_of(doc: dict[str, Any]) -> str:
    return f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"


def validate_doc(doc: dict[str, Any], versions: list[str], crds: dict[tuple[str, str], Any]) -> list[str]:
    errors: list[str] = []
    for field in ("apiVersion", "kind", "metadata"):
        if field not in doc:
            errors.append(f"no {field}")
    if errors:
        return errors
    if not (doc["metadata"] or {}).get("name"):
        errors.append("metadata.name is empty")
    key = (doc["apiVersion"], doc["kind"])
    if key in crds:
        validator = jsonschema.Draft7Validator(crds[key])
        errors += [f"{'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
                   for e in validator.iter_errors(doc)]
        return errors
    for version in versions:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path) or "(root)"
            errors.append(f"Kubernetes {version}: {where}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(f"Kubernetes {version}: no schema: {e.message}")
    return errors


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", help="rendered multi-document YAML files")
    ap.add_argument("--kube-version", action="append", required=True, help="Kubernetes version (repeatable)")
    ap.add_argument("--crd", action="append", default=[], help="CustomResourceDefinition YAML (repeatable)")
    args = ap.parse_args(argv)
    crds = load_crds(args.crd)
    failed = checked = 0
    for path in args.files:
        with open(path) as f:
            try:
                docs = [d for d in yaml.safe_load_all(f) if d]
            except yaml.YAMLError as e:
                print(f"FAIL {path}: not YAML: {e}")
                failed += 1
                continue
        if not docs:
            print(f"FAIL {path}: no objects")
            failed += 1
        for doc in docs:
            checked += 1
            errors = validate_doc(doc, args.kube_version, crds)
            via = "CRD schema" if (doc.get("apiVersion"), doc.get("kind")) in crds else \
                "Kubernetes " + ", ".join(args.kube_version)
            if errors:
                failed += 1
                print(f"FAIL {path}: {name_of(doc)}")
                for e in errors:
                    print(f"    {e}")
            else:
                print(f"ok   {path}: {name_of(doc)} ({doc['apiVersion']}, {via})")
    print(f"validate-manifests: {checked} objects, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
