"""Turn EngineArgs into a loaded (tokenizer, model) on the right device and dtype."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gateway.engine.args import EngineArgs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedSource:
    """A hub id or local folder, plus the GGUF file inside it when there is one."""

    path: str
    gguf_file: str | None
    is_local: bool


def resolve_source(spec: EngineArgs) -> ResolvedSource:
    source = spec.source
    if source.startswith("pkg:"):
        package, _, inner = source[4:].partition("/")
        # find_spec locates the package without importing it: the model packages'
        # own __init__ imports dependencies we deliberately do not install.
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(f"Python package '{package}' is not installed (needed for model source '{source}')")
        source = str(Path(list(found.submodule_search_locations)[0]) / inner)
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return ResolvedSource(str(path.parent), path.name, True)
    if path.exists():
        return ResolvedSource(str(path), spec.gguf_file, True)
    if source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model folder not found: {path}")
    return ResolvedSource(source, spec.gguf_file, False)  # a Hub id


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device '{requested}' requested but CUDA is not available")
    return device


def cpu_has_fast_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    try:
        with open(cpuinfo) as f:
            lines = f.read().splitlines()
    except OSError:
        return False  # not Linux, or no /proc: assume the slow path
    flags = {flag for line in lines if line.startswith("flags") for flag in line.partition(":")[2].split()}
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def pick_dtype(requested: str, device: torch.device, *, generative: bool = True) -> torch.dtype:
    """`auto`: a reduced precision where the hardware runs it fast; on a CPU only for the generation
    engine, which keeps the residual stream, norms and logits in float32 itself. Encoders (embeddings,
    classification, QA, seq2seq) stay float32 on a CPU: their outputs are read as numbers (vectors
    stored and compared across machines, scores), and bf16 moves them in the third digit by an
    amount that depends on the CPU's kernels. bf16 would run all-MiniLM-L6-v2's forward pass 1.3x
    (1 sentence) to 1.6x (16) faster on AVX512-BF16; `dtype: bfloat16` makes that trade."""
    if requested != "auto":
        return getattr(torch, requested)
    if device.type == "cuda":
        # GPUs before Ampere have no bf16 units; fp16 still halves memory and runs on their tensor cores.
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # Without native bf16 a CPU emulates it, slower than float32.
    return torch.bfloat16 if generative and cpu_has_fast_bf16() else torch.float32


def _gguf_cache_dir(cache_root: Path, gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:16]
    return cache_root / "gguf" / f"{gguf.stem}-{key}"


def _convert_gguf(source: ResolvedSource, target: Path, auto_cls: Any) -> None:
    """Dequantise a GGUF once and keep a plain checkpoint, so restarts load in well under a second."""
    from transformers import AutoTokenizer

    log.info("converting %s/%s (first start only)", source.path, source.gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    model = auto_cls.from_pretrained(source.path, gguf_file=source.gguf_file, dtype=torch.float32)
    # The weights are dequantised already; drop the GGUF quantizer marker so the
    # model can be saved, and name the architecture, which GGUF configs leave out.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def checkpoint_path(spec: EngineArgs, cache_root: Path, auto_cls: Any) -> tuple[str, dict[str, Any]]:
    """Where `from_pretrained` should read from, and the kwargs that go with it."""
    source = resolve_source(spec)
    kwargs: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if spec.revision:
        kwargs["revision"] = spec.revision
    if source.gguf_file is None:
        return source.path, kwargs
    if not source.is_local:
        return source.path, {**kwargs, "gguf_file": source.gguf_file}
    target = _gguf_cache_dir(cache_root, Path(source.path) / source.gguf_file)
    # The converted folder appears whole (renamed into place), so its config.json means "done".
    if not (target / "config.json").exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            _convert_gguf(source, target, auto_cls)
        except OSError as exc:
            if not (target / "config.json").exists():  # else another process converted it meanwhile
                # A read-only cache still serves, just slower to start.
                log.warning("could not cache converted GGUF (%s); loading it directly", exc)
                return source.path, {**kwargs, "gguf_file": source.gguf_file}
    return str(target), kwargs


def load_model(
    spec: EngineArgs, cache_root: Path, auto_cls: Any, preprocessor_cls: Any = None, *, generative: bool = True
) -> tuple[Any, Any, torch.device, torch.dtype]:
    """Load preprocessor and model for `spec` with `auto_cls` (e.g. AutoModelForCausalLM).

    The preprocessor is a tokenizer unless `preprocessor_cls` says otherwise (AutoImageProcessor);
    `generative` says the model runs on the generation engine (see `pick_dtype`).
    """
    from transformers import AutoTokenizer

    path, kwargs = checkpoint_path(spec, cache_root, auto_cls)
    device = pick_device(spec.device)
    dtype = pick_dtype(spec.dtype, device, generative=generative)
    tokenizer = (preprocessor_cls or AutoTokenizer).from_pretrained(path, **kwargs)
    model_kwargs = dict(kwargs, dtype=dtype)
    if spec.device_map:
        model_kwargs["device_map"] = spec.device_map  # accelerate places the layers
    model = auto_cls.from_pretrained(path, **model_kwargs)
    if spec.adapter:
        model = merge_adapter(model, spec.adapter)
    if not spec.device_map:
        model = model.to(device)
    model.eval()
    return tokenizer, model, device, dtype


def merge_adapter(model: Any, adapter: str) -> Any:
    """The base with a PEFT LoRA adapter merged into its weights: a plain transformers model again,
    so every forward path (the fused one included) serves it at the base's speed."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter).merge_and_unload()
