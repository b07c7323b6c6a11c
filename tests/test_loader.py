"""The local loader (gateway/engine/runtime/loader.py) on tiny random checkpoints, through the real loading code.

Only what needs hardware this machine may lack is patched: the CUDA and CPU-capability probes.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gateway.engine.args import EngineArgs
from gateway.engine.runtime import loader
from gateway.engine.runtime.loader import checkpoint_path, cpu_has_fast_bf16, load_model, pick_device, pick_dtype
from tests.tiny_models import CHAT_TEMPLATE, build_tiny_gguf, build_tiny_llama


class Recorded:
    """A transformers Auto class that keeps the arguments of every `from_pretrained` call."""

    def __init__(self, auto_cls: Any) -> None:
        self.auto_cls = auto_cls
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def from_pretrained(self, path: str, **kwargs: Any) -> Any:
        self.calls.append((path, kwargs))
        return self.auto_cls.from_pretrained(path, **kwargs)


def load(spec: EngineArgs, cache: Path) -> tuple[Any, Any, torch.device, torch.dtype, Recorded, Recorded]:
    model_cls, tokenizer_cls = Recorded(AutoModelForCausalLM), Recorded(AutoTokenizer)
    tokenizer, model, device, dtype = load_model(spec, cache, model_cls, tokenizer_cls)
    return tokenizer, model, device, dtype, model_cls, tokenizer_cls


def logits(tokenizer: Any, model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer("hello world", return_tensors="pt")).logits


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture()
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Path:
    """A fresh copy per test: the cache key follows the file's path, size and mtime."""
    built = tmp_path_factory.getbasetemp() / "tiny-gguf" / "tiny-llama.gguf"
    if not built.exists():
        build_tiny_gguf(built.parent)
    copy = tmp_path / "weights" / built.name
    copy.parent.mkdir()
    shutil.copy2(built, copy)
    return copy


@pytest.fixture()
def conversions(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Targets of every GGUF conversion, which still runs for real."""
    seen: list[Path] = []
    real = loader._convert_gguf

    def counted(source: Any, target: Path, auto_cls: Any) -> None:
        seen.append(target)
        real(source, target, auto_cls)

    monkeypatch.setattr(loader, "_convert_gguf", counted)
    return seen


# --- GGUF conversion cache -----------------------------------------------------------------------


def test_gguf_is_converted_once_and_the_copy_reused(tiny_gguf: Path, tmp_path: Path, conversions: list[Path]) -> None:
    spec = EngineArgs(source=str(tiny_gguf), device="cpu", dtype="float32")
    cache = tmp_path / "cache"
    tokenizer, model, *_, model_cls, tokenizer_cls = load(spec, cache)
    assert len(conversions) == 1
    [converted] = (cache / "gguf").iterdir()  # one folder, no leftover temporary copy
    assert converted == conversions[0]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in converted.iterdir()}
    # The conversion read the GGUF; the model and tokenizer served are read from the plain copy.
    assert model_cls.calls[0][1]["gguf_file"] == tiny_gguf.name
    served = [model_cls.calls[-1], tokenizer_cls.calls[-1]]
    assert [path for path, _ in served] == [str(converted)] * 2
    assert all("gguf_file" not in kwargs for _, kwargs in served)
    assert tokenizer.chat_template == CHAT_TEMPLATE

    again_tokenizer, again_model, *_ = load(spec, cache)  # a restart
    assert len(conversions) == 1
    assert torch.equal(logits(tokenizer, model), logits(again_tokenizer, again_model))

    # A replaced GGUF file (new size or mtime) is converted again, beside the old copy.
    stat = tiny_gguf.stat()
    os.utime(tiny_gguf, (stat.st_atime, stat.st_mtime + 60))
    path, _ = checkpoint_path(spec, cache, AutoModelForCausalLM)
    assert len(conversions) == 2 and Path(path) == conversions[1] != converted


def test_unwritable_cache_loads_the_gguf_directly(tiny_gguf: Path, tmp_path: Path, conversions: list[Path]) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")  # the cache root is a file, so nothing can be created under it
    spec = EngineArgs(source=str(tiny_gguf), device="cpu", dtype="float32")
    tokenizer, model, *_, model_cls, _ = load(spec, blocked / "cache")
    assert conversions == []
    assert model_cls.calls[0] == (
        str(tiny_gguf.parent),
        {"trust_remote_code": False, "gguf_file": tiny_gguf.name, "dtype": torch.float32},
    )
    assert logits(tokenizer, model).shape[-1] == model.config.vocab_size


# --- trust_remote_code ---------------------------------------------------------------------------

REMOTE_CODE = """
from transformers import LlamaConfig, LlamaForCausalLM


class RemoteTinyConfig(LlamaConfig):
    model_type = "remote-tiny"


class RemoteTinyForCausalLM(LlamaForCausalLM):
    config_class = RemoteTinyConfig
"""


@pytest.fixture(scope="module")
def remote_code_model(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama, declared as model code shipped with the checkpoint (`auto_map`)."""
    import json

    folder = tmp_path_factory.mktemp("remote-code") / "remote_tiny"
    shutil.copytree(tiny_llama, folder)
    (folder / "modeling_remote_tiny.py").write_text(REMOTE_CODE)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "remote-tiny"
    config["architectures"] = ["RemoteTinyForCausalLM"]
    config["auto_map"] = {
        "AutoConfig": "modeling_remote_tiny.RemoteTinyConfig",
        "AutoModelForCausalLM": "modeling_remote_tiny.RemoteTinyForCausalLM",
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_remote_code_is_refused_unless_the_model_turns_it_on(remote_code_model: Path, tmp_path: Path) -> None:
    spec = EngineArgs(source=str(remote_code_model), device="cpu", dtype="float32")
    assert spec.trust_remote_code is False
    model_cls = Recorded(AutoModelForCausalLM)
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_model(spec, tmp_path, model_cls)
    assert model_cls.calls[0][1]["trust_remote_code"] is False

    trusted = dataclasses.replace(spec, trust_remote_code=True)
    _, model, *_, model_cls, tokenizer_cls = load(trusted, tmp_path)
    assert type(model).__name__ == "RemoteTinyForCausalLM"  # the checkpoint's own code ran
    assert [kwargs["trust_remote_code"] for _, kwargs in tokenizer_cls.calls + model_cls.calls] == [True, True]


# --- dtype ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "requested, fast_bf16, expected",
    [
        ("float32", True, torch.float32),
        ("bfloat16", False, torch.bfloat16),
        ("float16", False, torch.float16),
        ("auto", True, torch.bfloat16),
        ("auto", False, torch.float32),
    ],
)
def test_model_is_loaded_in_the_resolved_dtype(
    tiny_llama: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    requested: str,
    fast_bf16: bool,
    expected: torch.dtype,
) -> None:
    monkeypatch.setattr(loader, "cpu_has_fast_bf16", lambda: fast_bf16)
    spec = EngineArgs(source=str(tiny_llama), device="cpu", dtype=requested)  # type: ignore[arg-type]
    _, model, device, dtype, model_cls, _ = load(spec, tmp_path)
    assert dtype == expected and model.dtype == expected and device == torch.device("cpu")
    assert model_cls.calls[0][1]["dtype"] == expected


@pytest.mark.parametrize("bf16_supported, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_dtype_on_a_gpu(monkeypatch: pytest.MonkeyPatch, bf16_supported: bool, expected: torch.dtype) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_supported)
    monkeypatch.setattr(loader, "cpu_has_fast_bf16", lambda: False)  # the CPU plays no part on a GPU
    assert pick_dtype("auto", torch.device("cuda", 0)) == expected
    assert pick_dtype("auto", torch.device("cuda", 0), generative=False) == expected
    assert pick_dtype("float32", torch.device("cuda", 0)) == torch.float32


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_auto_keeps_encoders_in_float32_on_a_cpu(monkeypatch: pytest.MonkeyPatch, fast_bf16: bool) -> None:
    """Embedding vectors and scores must not depend on which CPU computed them."""
    monkeypatch.setattr(loader, "cpu_has_fast_bf16", lambda: fast_bf16)
    cpu = torch.device("cpu")
    assert pick_dtype("auto", cpu, generative=False) == torch.float32
    assert pick_dtype("auto", cpu) == (torch.bfloat16 if fast_bf16 else torch.float32)
    assert pick_dtype("bfloat16", cpu, generative=False) == torch.bfloat16  # an explicit choice stands


@pytest.mark.parametrize(
    "cpuinfo, fast",
    [
        ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n", True),
        ("processor\t: 0\nflags\t\t: fpu sse2 avx2 amx_bf16 amx_tile amx_int8\n", True),
        ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n", False),
        ("processor\t: 0\nmodel name\t: avx512_bf16 lookalike\nflags\t\t: fpu sse2\n", False),
    ],
    ids=["avx512-bf16", "amx", "avx512-only", "name-is-not-a-flag"],
)
def test_cpu_bf16_probe_reads_the_flags(tmp_path: Path, cpuinfo: str, fast: bool) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo)
    assert cpu_has_fast_bf16(str(path)) is fast
    assert cpu_has_fast_bf16(str(tmp_path / "absent")) is False


# --- device and device_map -----------------------------------------------------------------------


def test_device_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    assert pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="'cuda:1' requested but CUDA is not available"):
        pick_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("cuda")
    assert pick_device("cuda:1") == torch.device("cuda", 1)


def test_device_is_applied_after_loading_without_a_device_map(tiny_llama: Path, tmp_path: Path) -> None:
    spec = EngineArgs(source=str(tiny_llama), device="cpu", dtype="float32")
    _, model, device, *_, model_cls, _ = load(spec, tmp_path)
    assert "device_map" not in model_cls.calls[0][1]
    assert {p.device for p in model.parameters()} == {device} == {torch.device("cpu")}
    assert not model.training


def test_device_map_is_handed_to_accelerate(tiny_llama: Path, tmp_path: Path) -> None:
    # "meta" is the one placement a CPU-only machine can tell apart from the default one; that the
    # weights stay there also shows the loader leaves a device_map model where accelerate put it.
    spec = EngineArgs(source=str(tiny_llama), device="cpu", dtype="float32", device_map="meta")
    _, model, *_, model_cls, _ = load(spec, tmp_path)
    assert model_cls.calls[0][1]["device_map"] == "meta"
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_engine_args_default_like_the_settings_they_come_from() -> None:
    """EngineArgs mirrors LocalBackendSpec's fields so the engine never imports the config: the
    defaults must not drift apart (a model configured with defaults would load differently)."""
    from dataclasses import MISSING, fields

    from gateway.config import LocalBackendSpec

    spec_fields = LocalBackendSpec.model_fields
    for field in fields(EngineArgs):
        assert field.name in spec_fields, field.name
        if field.default is not MISSING:
            assert spec_fields[field.name].default == field.default, field.name
    spec = LocalBackendSpec(kind="local", source="some/model")
    assert EngineArgs.of(spec) == EngineArgs(source="some/model")
