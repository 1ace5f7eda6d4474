"""lorta.packed: many adapters in one safetensors file; a torn or corrupted file fails only the adapters it touches."""

from __future__ import annotations

import json
import struct
import zlib

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

import lorta.packed
from lorta.packed import PackedAdapters, PackedFileError, append_packed, write_packed

BASE = {"model_shape": {"hidden_size": 16, "num_layers": 2}, "modules": ["q_proj", "v_proj"]}
CONFIG_A = {"peft_type": "LORTA", "r": 2, "target_modules": ["q_proj", "v_proj"]}
CONFIG_B = {"peft_type": "TLORA", "r": 4, "lora_alpha": 8.0}


def three() -> dict:
    """3 adapters, 2 distinct configs, several dtypes, a scalar and an empty tensor."""
    g = torch.Generator().manual_seed(0)
    return {
        "alice": (CONFIG_A, {"A": torch.randn(4, 2, generator=g), "B": torch.randn(3, 2, generator=g).bfloat16()}),
        "bob": (
            CONFIG_B,
            {
                "core": torch.randn(2, 2, generator=g, dtype=torch.float64),
                "index": torch.arange(5),
                "mask": torch.tensor([True, False, True]),
                "scale": torch.tensor(1.5, dtype=torch.float16),
                "empty": torch.zeros(0, 3),
                "codes": torch.tensor([1, 2, 255], dtype=torch.uint8),
                "count": torch.tensor([7, -3], dtype=torch.int32),
                "f8": torch.tensor([1.0, -2.0, 0.5]).to(torch.float8_e4m3fn),
            },
        ),
        "carol": (dict(CONFIG_A), {"A": torch.randn(4, 2, generator=g).half(), "B": torch.randn(3, 2, generator=g)}),
    }


def assert_same_state(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and got[key].shape == tensor.shape, key
        assert torch.equal(got[key].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), key  # bits


def header(path) -> tuple[int, dict]:
    """(start of the data, the safetensors header), parsed independently of lorta."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return 8 + length, json.loads(raw[8 : 8 + length])


def data_range(path, name: str, key: str) -> tuple[int, int]:
    start, head = header(path)
    begin, end = head[f"{name}/{key}"]["data_offsets"]
    return start + begin, start + end


def last_byte(path, name: str) -> int:
    start, head = header(path)
    return max(start + info["data_offsets"][1] for tensor, info in head.items() if tensor.startswith(f"{name}/"))


def data_order(path) -> list[str]:
    """The tensor names in the order of their bytes, checked to tile the data from its start to the file's end."""
    start, head = header(path)
    del head["__metadata__"]
    order = sorted(head, key=lambda tensor: head[tensor]["data_offsets"])  # stable: empty tensors keep their place
    ends = [0] + [head[tensor]["data_offsets"][1] for tensor in order]
    assert [head[tensor]["data_offsets"][0] for tensor in order] == ends[:-1]  # no gaps, no overlaps
    assert start % 8 == 0 and start + ends[-1] == path.stat().st_size  # header padded; the data runs to the end
    return order


def file_order(adapters: dict) -> list[str]:
    """Each adapter's tensors together, adapters in the mapping's order, keys sorted within an adapter."""
    return [f"{name}/{key}" for name, (_config, state) in adapters.items() for key in sorted(state)]


def test_round_trip_keeps_order_configs_and_bits(tmp_path):
    adapters, path = three(), tmp_path / "packed.safetensors"
    assert write_packed(path, adapters, BASE) == path.resolve()
    with PackedAdapters(path, base=BASE) as packed:
        assert packed.names == list(packed) == ["alice", "bob", "carol"] and len(packed) == 3
        assert "bob" in packed and "dave" not in packed and packed.base == BASE
        for name, (config, state) in adapters.items():
            assert packed.config(name) == config
            assert_same_state(packed.state(name), state)
            assert packed.nbytes(name) == sum(t.nbytes for t in state.values())
        packed.config("alice")["r"] = 99  # a copy
        assert packed.config("alice")["r"] == 2
    with safe_open(str(path), framework="pt") as file:
        meta = file.metadata()
        assert set(file.keys()) == {f"{name}/{key}" for name, (_c, state) in adapters.items() for key in state}
        assert torch.equal(file.get_tensor("bob/core"), adapters["bob"][1]["core"])
    assert meta["format"] == "lorta.packed" and meta["version"] == "1" and json.loads(meta["base"]) == BASE
    assert len(json.loads(meta["configs"])) == 2  # alice and carol share one config, stored once
    entries = json.loads(meta["adapters"])
    assert list(entries) == ["alice", "bob", "carol"] and entries["alice"]["config"] == entries["carol"]["config"]
    assert entries["bob"]["keys"] == sorted(adapters["bob"][1])
    assert data_order(path) == file_order(adapters)  # not safetensors.torch.save's order (by dtype, then name)


def every_dtype() -> dict:
    """Each dtype the file holds, as random bits (NaN payloads included): a matrix, a transposed view of it, a 0-dim
    view into it and an empty tensor."""
    g, state = torch.Generator().manual_seed(3), {}
    for name, dtype in lorta.packed._DTYPES.items():
        bits = torch.randint(0, 256, (6 * dtype.itemsize,), dtype=torch.uint8, generator=g)
        matrix = (bits % 2 if dtype == torch.bool else bits).view(dtype).view(2, 3)
        state |= {name: matrix, f"{name}.t": matrix.t(), f"{name}.0d": matrix[1, 2], f"{name}.empty": matrix[:0]}
    return state


def test_every_dtype_reads_back_bit_equal_through_safetensors_and_lorta(tmp_path):
    state, path = every_dtype(), tmp_path / "p"
    assert {"BF16", "BOOL", "F8_E4M3"} <= set(state)
    adapters = {"zeta": ({}, state), "alpha": ({}, {"w": torch.ones(3)})}  # file order, not name order
    write_packed(path, adapters, BASE)
    assert data_order(path) == file_order(adapters)
    want = {f"zeta/{key}": tensor for key, tensor in state.items()} | {"alpha/w": torch.ones(3)}
    with safe_open(str(path), framework="pt") as file:
        assert_same_state({key: file.get_tensor(key) for key in file.keys()}, want)
    assert_same_state(safetensors.torch.load(path.read_bytes()), want)
    with PackedAdapters(path) as packed:
        assert_same_state(packed.state("zeta"), state)


def test_a_closed_file_refuses_to_read(tmp_path):
    write_packed(tmp_path / "p", three(), BASE)
    with PackedAdapters(tmp_path / "p") as packed:
        state = packed.state("alice", device="cpu")
    assert torch.equal(state["A"], three()["alice"][1]["A"])  # copies: valid after close
    with pytest.raises(ValueError, match="is closed"):
        packed.state("alice")


def test_views_of_one_storage_are_written_as_separate_tensors(tmp_path):
    whole = torch.arange(12.0)
    write_packed(
        tmp_path / "p", {"a": ({}, {"A": whole[:6].view(2, 3), "B": whole[6:], "C": whole.view(3, 4).t()})}, {}
    )
    with PackedAdapters(tmp_path / "p") as packed:
        assert_same_state(packed.state("a"), {"A": whole[:6].view(2, 3), "B": whole[6:], "C": whole.view(3, 4).t()})


def test_append_adds_and_keeps_the_old_adapters(tmp_path):
    adapters, path = three(), tmp_path / "p"
    write_packed(path, {name: adapters[name] for name in ("alice", "bob")}, BASE)
    append_packed(path, {"carol": adapters["carol"]}, BASE)
    with PackedAdapters(path, base=BASE) as packed:
        assert packed.names == ["alice", "bob", "carol"]
        for name, (config, state) in adapters.items():
            assert packed.config(name) == config
            assert_same_state(packed.state(name), state)
    with safe_open(str(path), framework="pt") as file:
        assert len(json.loads(file.metadata()["configs"])) == 2
    assert data_order(path) == file_order(adapters)  # the appended adapter after the old ones


def test_append_refuses_a_taken_name_and_another_base_leaving_the_file_as_it_was(tmp_path):
    adapters, path = three(), tmp_path / "p"
    write_packed(path, adapters, BASE)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"already holds adapters \['bob'\]"):
        append_packed(path, {"dave": adapters["alice"], "bob": adapters["bob"]}, BASE)
    other = {**BASE, "modules": ["q_proj"]}
    with pytest.raises(
        PackedFileError, match=r'another base \(modules: the file has \["q_proj", "v_proj"\], expected \["q_proj"\]\)'
    ):
        append_packed(path, {"dave": adapters["alice"]}, other)
    with pytest.raises(ValueError, match="adapter name 'a/b'"):
        append_packed(path, {"a/b": adapters["alice"]}, BASE)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]


def test_a_file_for_another_base_is_refused_naming_each_key(tmp_path):
    write_packed(tmp_path / "p", three(), BASE)
    other = {"model_shape": {"hidden_size": 32, "num_layers": 2, "heads": 4}, "modules": BASE["modules"]}
    with pytest.raises(PackedFileError) as info:
        PackedAdapters(tmp_path / "p", base=other)
    message = str(info.value)
    assert "model_shape.hidden_size: the file has 16, expected 32" in message
    assert "model_shape.heads: the file has no such key, expected 4" in message
    assert "num_layers" not in message and "load it onto the model" in message and "pack the adapters" in message
    with PackedAdapters(tmp_path / "p") as packed:
        packed.check_base({**BASE, "modules": ("q_proj", "v_proj")})  # JSON-equal: a tuple is a list
        with pytest.raises(PackedFileError, match="modules"):
            packed.check_base({**BASE, "modules": ["q_proj"]})
        with pytest.raises(PackedFileError, match="num_layers: the file has 2, expected 2.0"):  # JSON text differs
            packed.check_base({**BASE, "model_shape": {"hidden_size": 16, "num_layers": 2.0}})


def test_a_flipped_byte_fails_only_its_own_adapter(tmp_path):
    adapters, path = three(), tmp_path / "p"
    write_packed(path, adapters, BASE)
    raw = bytearray(path.read_bytes())
    begin, _end = data_range(path, "bob", "core")
    raw[begin + 3] ^= 0x10
    path.write_bytes(bytes(raw))
    with PackedAdapters(path, base=BASE) as packed:
        with pytest.raises(PackedFileError, match=r"adapter 'bob' in .* checksum"):
            packed.state("bob")
        for name in ("alice", "carol"):  # their bytes are read and verified alone
            assert_same_state(packed.state(name), adapters[name][1])
        with pytest.raises(PackedFileError, match="'bob'"):
            append_packed(path, {"dave": adapters["alice"]}, BASE)


def twenty() -> dict:
    g = torch.Generator().manual_seed(2)
    return {
        f"t{i:02d}": (CONFIG_A, {"A": torch.randn(4, 2, generator=g), "B": torch.randn(2, 3, generator=g)})
        for i in range(20)
    }


def twenty_backwards() -> dict:
    return dict(reversed(twenty().items()))  # file order is not name order


@pytest.mark.parametrize(
    "make,cut", [(three, "one byte"), (twenty, "one byte"), (twenty, "half"), (twenty_backwards, "half")]
)
def test_a_truncated_file_serves_every_adapter_whose_bytes_are_all_there(tmp_path, make, cut):
    """The data is laid out adapter by adapter, in file order: a cut loses the adapters from the cut onwards."""
    adapters, path = make(), tmp_path / "p"
    write_packed(path, adapters, BASE)
    raw = path.read_bytes()
    start, _head = header(path)
    size = len(raw) - 1 if cut == "one byte" else start + (len(raw) - start) // 2
    ends = {name: last_byte(path, name) for name in adapters}
    path.write_bytes(raw[:size])
    whole = [name for name in adapters if ends[name] <= size]
    assert len(whole) == (len(adapters) - 1 if cut == "one byte" else len(adapters) // 2)
    assert whole == list(adapters)[: len(whole)]  # the first in file order, whatever their names
    with PackedAdapters(path, base=BASE) as packed:
        assert packed.names == list(adapters)
        for name, (_config, state) in adapters.items():
            if name in whole:
                assert_same_state(packed.state(name), state)
            else:
                cut_short = rf"'{name}'.*its data ends at byte {ends[name]} but the file has {size} bytes: the file"
                with pytest.raises(PackedFileError, match=cut_short + " was cut short; rewrite it with write_packed"):
                    packed.state(name)


def six_mixed() -> dict:
    """6 adapters, each of five dtypes, named against the sort order."""
    g = torch.Generator().manual_seed(4)
    return {
        name: (
            CONFIG_A,
            {
                "A": torch.randn(4, 2, generator=g),
                "B": torch.randn(3, 2, generator=g).bfloat16(),
                "mask": torch.rand(5, generator=g) > 0.5,
                "scale": torch.tensor(i + 0.5, dtype=torch.float16),
                "steps": torch.arange(i + 2),
            },
        )
        for i, name in enumerate(["zed", "yan", "xia", "wu", "val", "uma"])
    }


def test_a_mixed_dtype_file_cut_inside_the_fourth_adapter_serves_the_first_three(tmp_path):
    """safetensors.torch.save (by dtype, then name) spreads each adapter over every dtype's block: this cut would
    break all six."""
    adapters, path = six_mixed(), tmp_path / "p"
    write_packed(path, adapters, BASE)
    raw, (start, head) = path.read_bytes(), header(path)
    assert data_order(path) == file_order(adapters)
    fourth = [head[f"wu/{key}"]["data_offsets"] for key in adapters["wu"][1]]
    begin, end = start + min(b for b, _e in fourth), start + max(e for _b, e in fourth)
    assert end - begin == sum(t.nbytes for t in adapters["wu"][1].values())  # its bytes are one run
    size = (begin + end) // 2
    path.write_bytes(raw[:size])
    with PackedAdapters(path, base=BASE) as packed:
        assert packed.names == list(adapters)
        for name in ["zed", "yan", "xia"]:
            assert_same_state(packed.state(name), adapters[name][1])
        for name in ["wu", "val", "uma"]:
            with pytest.raises(
                PackedFileError, match=rf"adapter '{name}' .* but the file has {size} bytes: .* cut short"
            ):
                packed.state(name)


def write_lorta_header(path, metadata: dict) -> None:
    safetensors.torch.save_file({"a/A": torch.zeros(2)}, str(path), metadata=metadata)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda p: p.write_bytes(b""), r"0 bytes, no header"),
        (lambda p: p.write_bytes(b"short"), r"5 bytes, no header"),
        (lambda p: p.write_bytes(b"this is not a safetensors file at all"), r"its header is \d+ bytes but the file"),
        (lambda p: p.write_bytes(struct.pack("<Q", 100) + b"{}"), r"its header is 100 bytes but the file has 10"),
        (lambda p: p.write_bytes(struct.pack("<Q", 5) + b"{{{{{"), r"not a safetensors JSON header"),
        (lambda p: p.write_bytes(struct.pack("<Q", 2) + b"[]"), r"not a safetensors JSON header"),
        (lambda p: safetensors.torch.save_file({"w": torch.zeros(2)}, str(p)), r"no format tag 'lorta.packed'"),
        (lambda p: write_lorta_header(p, {"format": "lorta.packed", "version": "2"}), r"version '2', this lorta"),
        (lambda p: write_lorta_header(p, {"format": "lorta.packed", "version": "1"}), r"'base' is not a JSON dict"),
        (
            lambda p: write_lorta_header(p, {"format": "lorta.packed", "version": "1", "base": "{}", "configs": "[]"}),
            r"'adapters' is not a JSON dict",
        ),
    ],
)
def test_a_bad_header_refuses_the_whole_file_at_open(tmp_path, make, match):
    make(tmp_path / "bad")
    with pytest.raises(PackedFileError, match=match) as info:
        PackedAdapters(tmp_path / "bad")
    assert str(tmp_path / "bad") in str(info.value) and "write" in str(info.value)


def test_a_broken_index_entry_refuses_only_its_adapter(tmp_path):
    meta = {"format": "lorta.packed", "version": "1", "base": "{}", "configs": "[{}]"}
    meta["adapters"] = json.dumps(
        {"a": {"config": 0, "keys": ["A"], "crc32": zlib.crc32(bytes(8))}, "b": {"config": 5, "keys": ["Z"]}}
    )
    write_lorta_header(tmp_path / "p", meta)
    with PackedAdapters(tmp_path / "p") as packed:
        assert torch.equal(packed.state("a")["A"], torch.zeros(2)) and packed.config("a") == {}
        with pytest.raises(PackedFileError, match=r"adapter 'b' .* its tensor 'Z' is missing"):
            packed.state("b")
        with pytest.raises(PackedFileError, match=r"adapter 'b' .* config index 5"):
            packed.config("b")
        with pytest.raises(KeyError, match="holds no adapter 'c'; it holds 2 \\(a, b\\)"):
            packed.state("c")


def _state() -> dict:
    return {"A": torch.ones(2, 2)}


@pytest.mark.parametrize(
    "adapters,match",
    [
        ({"a/b": ({}, _state())}, r"adapter name 'a/b' cannot be packed: .* without '/'"),
        ({"": ({}, _state())}, r"adapter name '' cannot be packed"),
        ({"__base__": ({}, _state())}, r"not '__base__' \(the bare model's name"),
        ({3: ({}, _state())}, r"adapter name 3 cannot be packed"),
        ({"a": ({}, {"A": [1.0, 2.0]})}, r"adapter 'a': state\['A'\] is list, not a dense tensor"),
        ({"a": ({}, {"A": torch.ones(2).to_sparse()})}, r"state\['A'\] is Tensor, not a dense tensor"),
        (
            {"a": ({}, {"A": torch.ones(2, dtype=torch.complex64)})},
            r"is torch.complex64; convert it to one of \[torch.float64",
        ),
        ({"a": ({}, {})}, r"adapter 'a': its state must be a non-empty mapping"),
        ({"a": ({}, {"": torch.ones(1)})}, r"state key '' is not a non-empty string"),
        ({"a": _state()}, r"adapter 'a': pass \(config dict, state\)"),
        ({"a": ({"x": object()}, _state())}, r"the config of adapter 'a' is not JSON-serialisable"),
        ({"a": ({"x": float("nan")}, _state())}, r"the config of adapter 'a' is not JSON-serialisable"),
    ],
)
def test_a_refused_write_leaves_the_file_as_it_was(tmp_path, adapters, match):
    path = tmp_path / "p"
    with pytest.raises(ValueError, match=match):
        write_packed(path, {"ok": ({}, _state()), **adapters}, BASE)
    assert not path.exists()
    write_packed(path, three(), BASE)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=match):
        write_packed(path, {"ok": ({}, _state()), **adapters}, BASE, overwrite=True)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["p"]


def test_a_base_that_is_not_json_is_refused(tmp_path):
    with pytest.raises(ValueError, match="the base is not JSON-serialisable"):
        write_packed(tmp_path / "p", three(), {"shape": torch.Size([2])} | {"x": object()})
    with pytest.raises(ValueError, match="the base must be a dict"):
        write_packed(tmp_path / "p", three(), ["not", "a", "dict"])
    assert not (tmp_path / "p").exists()


def test_an_existing_file_is_replaced_only_with_overwrite(tmp_path):
    path = tmp_path / "p"
    write_packed(path, three(), BASE)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        write_packed(path, {"x": ({}, _state())}, BASE)
    assert path.read_bytes() == before
    write_packed(path, {"x": ({}, _state())}, BASE, overwrite=True)
    with PackedAdapters(path) as packed:
        assert packed.names == ["x"]


def _half_then_fail(tmp: str, data: bytes) -> None:
    with open(tmp, "wb") as file:
        file.write(data[: len(data) // 2])
    raise OSError("disk full")


def _serialise_fails(*args, **kwargs):
    raise RuntimeError("serialisation failed")


@pytest.mark.parametrize("target,replacement", [("_write_bytes", _half_then_fail), ("_serialise", _serialise_fails)])
def test_an_interrupted_write_leaves_no_file_or_the_old_one(tmp_path, monkeypatch, target, replacement):
    path, adapters = tmp_path / "p", three()
    write_packed(path, {"alice": adapters["alice"]}, BASE)
    before = path.read_bytes()
    monkeypatch.setattr(lorta.packed, target, replacement)
    with pytest.raises((OSError, RuntimeError)):
        write_packed(tmp_path / "new", adapters, BASE)
    with pytest.raises((OSError, RuntimeError)):
        append_packed(path, {"bob": adapters["bob"]}, BASE)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["p"]


def test_two_thousand_adapters_in_one_file(tmp_path):
    g = torch.Generator().manual_seed(1)
    adapters = {
        f"tenant_{i:05d}": (CONFIG_A, {"A": torch.randn(4, 2, generator=g), "B": torch.randn(2, 3, generator=g)})
        for i in reversed(range(2000))  # file order is the caller's, not sorted
    }
    path = write_packed(tmp_path / "tenants.safetensors", adapters, BASE)
    with safe_open(str(path), framework="pt") as file:
        assert len(json.loads(file.metadata()["configs"])) == 1
    with PackedAdapters(path, base=BASE) as packed:
        assert packed.names == list(adapters) and len(packed) == 2000
        for name in ["tenant_00000", "tenant_01234", "tenant_01999", *packed.names[::97]]:
            assert_same_state(packed.state(name), adapters[name][1])
            assert packed.config(name) == CONFIG_A and packed.nbytes(name) == (8 + 6) * 4
