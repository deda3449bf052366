"""A small kustomize renderer for the manifests in ``docker/kubernetes``, so that their tests need no kubectl.

It supports exactly what those kustomizations use, and raises :class:`Unsupported` on anything else rather
than render it wrongly:

* ``resources``: YAML files (one or more documents each) and directories holding a ``kustomization.yaml``;
* ``components``: directories holding a ``Component``, applied in order to what the including kustomization
  has accumulated, after its resources;
* ``patches``: ``path:`` entries only, each file one strategic-merge patch of one object, found by its
  apiVersion, kind and name. Maps merge key by key and ``null`` removes a key; a list merges by its
  Kubernetes merge key, or is replaced, only at the paths of :data:`MERGE_KEYS` and :data:`REPLACED_LISTS`;
  a list elsewhere, and any ``$patch`` or other ``$`` directive, is refused. A merged list is the patch's
  elements in the patch's order, each merged into its match, then the others in their order, as kustomize
  writes it;
* ``namespace``: set on every object of a namespaced kind of :data:`NAMESPACED`; a ``Namespace`` object is
  renamed to it, as kustomize does;
* ``images``: ``name`` with ``newName`` and/or ``newTag``, on the images of pod templates' containers and
  init containers.

The transformers of one kustomization run in kustomize's order: patches, namespace, images.
``tests/ops/test_kubernetes.py`` compares what this renders with ``kubectl kustomize`` wherever kubectl is
installed.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

NAMESPACED = {"Deployment", "Service", "PodDisruptionBudget", "Ingress", "ScaledObject", "ServiceMonitor"}
CLUSTER_SCOPED = {"Namespace"}
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "components", "patches", "namespace", "images"}
API_VERSIONS = {"Kustomization": "kustomize.config.k8s.io/v1beta1", "Component": "kustomize.config.k8s.io/v1alpha1"}

POD = ("spec", "template", "spec")
CONTAINERS = (*POD, "containers", "*")
# Lists that a strategic-merge patch merges element by element, by this key (the Kubernetes API's
# patchMergeKey); "*" stands for an element of a merged list.
MERGE_KEYS = {
    (*POD, "containers"): "name",
    (*POD, "initContainers"): "name",
    (*POD, "volumes"): "name",
    (*CONTAINERS, "env"): "name",
    (*CONTAINERS, "volumeMounts"): "mountPath",
}
# Lists that Kubernetes gives no merge strategy: a patch replaces them whole.
REPLACED_LISTS = {(*POD, "tolerations"), (*CONTAINERS, "command"), (*CONTAINERS, "args")}


class Unsupported(ValueError):
    """A kustomization or patch uses something this renderer does not implement."""


def render(directory: str | Path) -> list[dict]:
    """The objects that ``kubectl kustomize DIRECTORY`` writes, as dicts, in the order they are declared
    (kustomize sorts them by kind).

    Args:
        directory: a folder holding a ``kustomization.yaml`` of kind ``Kustomization``.
    """
    return _build(Path(directory), [], expect="Kustomization")


def _build(directory: Path, accumulated: list[dict], expect: str) -> list[dict]:
    spec = _kustomization(directory, expect)
    objects = accumulated
    for entry in spec.get("resources", []):
        path = _local(directory, entry)
        objects += _build(path, [], "Kustomization") if path.is_dir() else _documents(path)
    for entry in spec.get("components", []):
        path = _local(directory, entry)
        if not path.is_dir():
            raise Unsupported(f"{directory}: component {entry} is not a directory")
        objects = _build(path, objects, "Component")
    for entry in spec.get("patches", []):
        if set(entry) != {"path"}:
            raise Unsupported(f"{directory}: only `path:` patches are supported, not {sorted(entry)}")
        _apply_patch(objects, _documents(_local(directory, entry["path"])), directory / entry["path"])
    if "namespace" in spec:
        _set_namespace(objects, spec["namespace"])
    for image in spec.get("images", []):
        _set_image(objects, image)
    _check_unique(objects, directory)
    return objects


def _kustomization(directory: Path, expect: str) -> dict:
    path = directory / "kustomization.yaml"
    if not path.is_file():
        raise Unsupported(f"{directory} has no kustomization.yaml")
    spec = yaml.safe_load(path.read_text()) or {}
    unknown = set(spec) - KUSTOMIZATION_KEYS
    if unknown:
        raise Unsupported(f"{path}: unsupported fields {sorted(unknown)}")
    kind = spec.get("kind", "Kustomization")
    if kind != expect or spec.get("apiVersion", API_VERSIONS[kind]) != API_VERSIONS[kind]:
        raise Unsupported(f"{path}: expected a {expect} ({API_VERSIONS[expect]}), found {kind}")
    return spec


def _local(directory: Path, entry: str) -> Path:
    if "://" in entry or entry.startswith(("github.com", "git@")):
        raise Unsupported(f"{directory}: remote {entry} is not supported")
    path = (directory / entry).resolve()
    if not path.exists():
        raise FileNotFoundError(f"{directory}: {entry} does not exist")
    return path


def _documents(path: Path) -> list[dict]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document is not None]


def _identity(obj: dict) -> tuple[str, str, str, str]:
    metadata = obj.get("metadata", {})
    return obj["apiVersion"], obj["kind"], metadata.get("namespace", ""), metadata["name"]


def _check_unique(objects: list[dict], directory: Path) -> None:
    seen = set()
    for obj in objects:
        if _identity(obj) in seen:
            raise Unsupported(f"{directory}: {_identity(obj)} is declared twice")
        seen.add(_identity(obj))


def _apply_patch(objects: list[dict], documents: list[dict], path: Path) -> None:
    if len(documents) != 1:
        raise Unsupported(f"{path}: a patch file must hold one object, found {len(documents)}")
    patch = documents[0]
    wanted = (patch["apiVersion"], patch["kind"], patch["metadata"].get("namespace"), patch["metadata"]["name"])
    targets = [index for index, obj in enumerate(objects)
               if _identity(obj)[:2] == wanted[:2] and _identity(obj)[3] == wanted[3]
               and wanted[2] in (None, _identity(obj)[2])]
    if len(targets) != 1:
        raise Unsupported(f"{path}: the patch matches {len(targets)} objects, not one")
    body = {key: value for key, value in patch.items() if key not in ("apiVersion", "kind")}
    objects[targets[0]] = strategic_merge(objects[targets[0]], body)


def strategic_merge(target: dict, patch: dict, path: tuple[str, ...] = ()) -> dict:
    """``patch`` merged into a copy of ``target`` (a strategic-merge patch, within the limits above)."""
    merged = copy.deepcopy(target)
    for key, value in patch.items():
        if key.startswith("$"):
            raise Unsupported(f"the directive {key} at {'.'.join(path) or 'the top'} is not supported")
        here = (*path, key)
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict):
            existing = merged.get(key)
            merged[key] = strategic_merge(existing if isinstance(existing, dict) else {}, value, here)
        elif isinstance(value, list):
            merged[key] = _merge_list(merged.get(key) or [], value, here)
        else:
            merged[key] = value
    return merged


def _merge_list(target: list, patch: list, path: tuple[str, ...]) -> list:
    if path in REPLACED_LISTS:
        return copy.deepcopy(patch)
    if path not in MERGE_KEYS:
        raise Unsupported(f"a list at {'.'.join(path)} in a patch is not supported")
    key = MERGE_KEYS[path]
    remaining = list(target)
    merged = []
    for element in patch:
        match = next((item for item in remaining if item.get(key) == element[key]), None)
        if match is None:
            merged.append(strategic_merge({}, element, (*path, "*")))
        else:
            remaining.remove(match)
            merged.append(strategic_merge(match, element, (*path, "*")))
    return merged + copy.deepcopy(remaining)


def _set_namespace(objects: list[dict], namespace: str) -> None:
    for obj in objects:
        if obj["kind"] in NAMESPACED:
            obj["metadata"]["namespace"] = namespace
        elif obj["kind"] == "Namespace":
            obj["metadata"]["name"] = namespace
        else:
            raise Unsupported(f"is {obj['kind']} namespaced? this renderer does not know")


def _set_image(objects: list[dict], image: dict) -> None:
    if set(image) - {"name", "newName", "newTag"} or "name" not in image:
        raise Unsupported(f"images entry {image}: only name, newName and newTag are supported")
    for obj in objects:
        pod = obj.get("spec", {}).get("template", {}).get("spec", {})
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            reference = container["image"]
            if "@" in reference:
                raise Unsupported(f"image digests ({reference}) are not supported")
            name, _, tag = reference.rpartition(":") if ":" in reference.rsplit("/", 1)[-1] else (reference, "", "")
            if name == image["name"]:
                name = image.get("newName", name)
                tag = image.get("newTag", tag)
                container["image"] = f"{name}:{tag}" if tag else name
