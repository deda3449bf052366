import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model import CheckpointError, Gate, GateConfig, load_checkpoint, save_checkpoint
from model.checkpoint import METADATA_KEY, _tensors_digest
from tests.conftest import randomize, tiny_subnets


def test_round_trip_keeps_weights_table_and_provenance(tiny_net, tmp_path):
    gate = Gate(GateConfig(num_subnets=3))
    subnets = tiny_subnets(tiny_net)
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, tiny_net, gate, subnets, gate_trained=True, provenance={"steps": 5})
    loaded = load_checkpoint(path)
    assert loaded.subnets == subnets and loaded.gate_trained and loaded.provenance == {"steps": 5}
    for name, tensor in tiny_net.state_dict().items():
        assert torch.equal(loaded.net.state_dict()[name], tensor)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.net(x, subnets[1].widths), tiny_net(x, subnets[1].widths))
        assert torch.equal(loaded.gate(x), gate(x))


def test_fp16_checkpoint_loads_as_float32(tiny_net, tmp_path):
    path = tmp_path / "half.safetensors"
    save_checkpoint(path, tiny_net, Gate(GateConfig(num_subnets=3)), tiny_subnets(tiny_net), gate_trained=False,
                    dtype=torch.float16)
    loaded = load_checkpoint(path)
    assert loaded.net.head.weight.dtype == torch.float32
    assert torch.allclose(loaded.net.head.weight, tiny_net.head.weight, atol=1e-3)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_truncated_file_is_refused(tiny_checkpoint, tmp_path):
    data = open(tiny_checkpoint, "rb").read()
    for cut in (5, 100, len(data) - 10):
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated|corrupted|not a readable"):
            load_checkpoint(path)


def test_flipped_weight_bytes_are_refused(tiny_checkpoint, tmp_path):
    data = bytearray(open(tiny_checkpoint, "rb").read())
    data[-20] ^= 0xFF
    path = tmp_path / "flipped.safetensors"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(path)


def test_not_a_checkpoint(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointError, match="not a ddsnet checkpoint"):
        load_checkpoint(plain)
    text = tmp_path / "text.safetensors"
    text.write_text("hello, I am not a checkpoint")
    with pytest.raises(CheckpointError):
        load_checkpoint(text)


def _rewrite_metadata(source: str, target, edit) -> None:
    """Rewrite the JSON header of a safetensors file, keeping its tensor bytes."""
    data = open(source, "rb").read()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    document = json.loads(header["__metadata__"]["ddsnet"])
    edit(document)
    header["__metadata__"]["ddsnet"] = json.dumps(document)
    new_header = json.dumps(header).encode()
    new_header += b" " * (-len(new_header) % 8)
    target.write_bytes(struct.pack("<Q", len(new_header)) + new_header + data[8 + length :])


def test_config_that_does_not_match_the_weights_is_refused(tiny_checkpoint, tmp_path):
    path = tmp_path / "mismatch.safetensors"

    def widen(document):
        document["model"]["channels"] = [16, 16, 32]
        document["subnets"] = document["subnets"][:1]
        document["subnets"][0]["widths"][0] = 16
        document["gate"]["config"]["num_subnets"] = 1

    _rewrite_metadata(tiny_checkpoint, path, widen)
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(path)


def test_bad_version_and_bad_table_are_refused(tiny_checkpoint, tmp_path):
    path = tmp_path / "v.safetensors"
    _rewrite_metadata(tiny_checkpoint, path, lambda d: d.update(version=99))
    with pytest.raises(CheckpointError, match="version"):
        load_checkpoint(path)
    _rewrite_metadata(tiny_checkpoint, path, lambda d: d["subnets"][0].update(widths=[1, 2, 3]))
    with pytest.raises(CheckpointError, match="sub-network table"):
        load_checkpoint(path)


def test_a_table_written_with_the_former_channels_key_loads_the_same_configurations(tiny_checkpoint, tmp_path):
    path = tmp_path / "former.safetensors"

    def rename(document):
        for row in document["subnets"]:
            row["channels"] = row.pop("widths")

    _rewrite_metadata(tiny_checkpoint, path, rename)
    expected = [s.widths for s in load_checkpoint(tiny_checkpoint).subnets]
    assert [s.widths for s in load_checkpoint(path).subnets] == expected


def test_save_refuses_a_gate_of_the_wrong_size(tiny_net, tmp_path):
    with pytest.raises(ValueError):
        save_checkpoint(tmp_path / "x.safetensors", randomize(tiny_net), Gate(GateConfig(num_subnets=2)),
                        tiny_subnets(tiny_net), gate_trained=False)


# The tensor digest of the weights that benchmarks/results/profiles.json measured.
SHIPPED_TENSORS_SHA256 = "a60ccc4bcaf55637f22895957c77f187f866d0e4b30477fb6772f59cc6a015ef"


def test_the_shipped_checkpoint_holds_the_measured_weights_and_a_flat_provenance_without_paths():
    from model import DEFAULT_CHECKPOINT
    from model.checkpoint import _tensors_digest, read_metadata

    root = Path(__file__).resolve().parents[2]
    path = root / DEFAULT_CHECKPOINT
    document = read_metadata(path)
    with safe_open(str(path), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    assert _tensors_digest(tensors) == document["tensors_sha256"] == SHIPPED_TENSORS_SHA256

    provenance = document["provenance"]
    assert set(provenance) == {"recipe", "versions", "stages"}
    assert provenance["recipe"] == "ddsnet-color" and (root / "training/recipes/ddsnet-color.sh").is_file()
    assert list(provenance["stages"]) == ["supernet", "tailor", "profile", "gate"]

    def strings(node):
        if isinstance(node, dict):
            for key, value in node.items():
                yield key
                yield from strings(value)
        elif isinstance(node, list):
            for value in node:
                yield from strings(value)
        elif isinstance(node, str):
            yield node

    assert not [s for s in strings(provenance) if "/" in s or s in {"previous", "command"}]


def hostile_checkpoint(source: str, target: Path, edit=None, tensors_edit=None) -> Path:
    with safe_open(source, framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        document = json.loads(handle.metadata()[METADATA_KEY])
    if tensors_edit:
        tensors_edit(tensors)
        document["tensors_sha256"] = _tensors_digest(tensors)
    metadata = document if edit is None else edit(document)
    save_file(tensors, str(target), metadata={METADATA_KEY: metadata if isinstance(metadata, str)
                                              else json.dumps(metadata)})
    return target


def set_field(path: list, value):
    def edit(document):
        node = document
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return document
    return edit


@pytest.mark.parametrize("edit,message", [
    (lambda d: json.dumps([d]), "JSON object"),
    (lambda d: "[" * 100_000 + "]" * 100_000, "nested too deeply|JSON object"),
    (set_field(["model", "steps_per_width"], 0), "steps_per_width"),
    (set_field(["model", "channels"], [2**20, 2**20, 2**20]), "model.channels"),
    (set_field(["model", "body_blocks"], 10**9), "body_blocks"),
    (set_field(["model", "body_blocks"], 5), "shape|missing|unexpected"),
    (set_field(["subnets"], []), "subnets"),
    (set_field(["gate", "config", "num_subnets"], "three"), "num_subnets"),
])
def test_hostile_checkpoint_metadata_is_one_clear_error_without_allocating(tiny_checkpoint, tmp_path, edit, message):
    path = hostile_checkpoint(tiny_checkpoint, tmp_path / "bad.safetensors", edit)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_non_finite_weights_are_refused(tiny_checkpoint, tmp_path):
    def poison(tensors):
        name = next(name for name in sorted(tensors) if name.startswith("net."))
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] = float("nan")

    path = hostile_checkpoint(tiny_checkpoint, tmp_path / "nan.safetensors", tensors_edit=poison)
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        load_checkpoint(path)


def test_two_profiles_round_trip_in_float16_at_half_the_bytes_of_float32(two_profile_checkpoint, tmp_path):
    loaded = load_checkpoint(two_profile_checkpoint)
    assert loaded.profiles == ["white", "compressed"]
    assert [s.profile for s in loaded.subnets] == ["white"] * 3 + ["compressed"] * 3
    assert not torch.equal(loaded.nets["white"].head.weight, loaded.nets["compressed"].head.weight)
    assert all(p.dtype == torch.float32 for net in loaded.nets.values() for p in net.parameters())
    single = tmp_path / "white.safetensors"
    save_checkpoint(single, loaded.net, Gate(GateConfig(num_subnets=3)), loaded.subnets[:3], gate_trained=False)
    # Two profiles in float16 take the bytes of one in float32 (plus the gate and the header).
    assert Path(two_profile_checkpoint).stat().st_size < 1.1 * single.stat().st_size


def test_a_row_of_an_unknown_profile_is_refused(two_profile_checkpoint, tmp_path):
    target = tmp_path / "bad.safetensors"
    _rewrite_metadata(two_profile_checkpoint, target, lambda doc: doc["subnets"][0].update(profile="night"))
    with pytest.raises(CheckpointError, match="subnets\\[0\\].profile must be one of"):
        load_checkpoint(target)
