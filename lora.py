"""LoRA (Hu et al. 2021): train a low-rank update B @ A beside each frozen linear layer instead of the layer itself.

    y = base(x) + (dropout(x) @ A.T @ B.T) * alpha / r          A: (r, in), random;  B: (out, r), zeros at start

so the adapted model starts out equal to the base. Only A and B train (plus any modules named in `trainable`, such
as the embeddings and lm_head for added tokens: PEFT's modules_to_save); merging folds the update into the weight
(W + B @ A * alpha / r) and the model is a plain Transformer again (an adapter on a tied lm_head unties it: the
output layer changes, the embedding does not). QLoRA (Dettmers et al. 2023, quantize="nf4")
keeps the frozen base linears as bitsandbytes NF4 codes with bf16 matmuls and A and B in fp32; merging then
dequantises the base first.

Adapters are saved as PEFT folders (adapter_config.json + adapter_model.safetensors with transformers' module
names), so an adapter trained here loads with peft.PeftModel on the transformers model, and one trained with peft
on a transformers LLaMA/Phi loads here:

    model, base = lora.load(adapter_dir)                   # the base from adapter_config.json's base_model_name_or_path
    model, base = lora.load(adapter_dir, base="base_dir")  # or a base named here (a folder or a .gguf)
    lora.add_lora(model, rank=8, alpha=16)                 # fresh adapters on a model; freezes everything else
    lora.add_lora(model, 32, 32, 0.1, "Wqkv,out_proj,fc1,fc2", trainable="embed,lm_head", quantize="nf4")  # QLoRA
    lora.save_adapter(model, out_dir, base="base_dir")
    lora.merge_lora(model, dtype=torch.bfloat16)           # back to plain nn.Linear layers
"""
import json
import math
import os
import re
from contextlib import contextmanager

import torch
import torch.nn as nn

import convert
from model import resize_embeddings, swap_modules

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "fc1", "fc2")
# names recipes use for our modules: transformers' Phi (dense), microsoft/phi-2's own (fused Wqkv, out_proj; we
# split Wqkv into q/k/v on loading), and transformers' embedding (embed_tokens)
ALIASES = {"Wqkv": ("q_proj", "k_proj", "v_proj"), "out_proj": ("o_proj",), "dense": ("o_proj",),
           "embed_tokens": ("embed",)}


class LoRALinear(nn.Module):
    """A frozen linear layer (nn.Linear, or any module with in_features/out_features such as a quantized one)
    plus a trainable low-rank update."""

    def __init__(self, base, rank, alpha, dropout=0.0, use_rslora=False):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.rank, self.alpha, self.use_rslora = rank, alpha, use_rslora
        # rsLoRA (Kalajdzievski 2023) scales by alpha/sqrt(r), so the update's size does not shrink as r grows
        self.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        weight = base.weight
        factory = dict(device=weight.device, dtype=weight.dtype if weight.is_floating_point() else torch.float32)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's (and PEFT's) init of A
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def weight(self):  # code that reads .weight (dtype, device) keeps working
        return self.base.weight

    def forward(self, x):
        out = self.base(x)
        if torch.is_autocast_enabled(x.device.type):
            # autocast runs the matmuls in its dtype: an fp32 copy of x first would only cost time and memory
            # (measured: 12% of a SmolLM2 LoRA step on CPU, and 11% of its peak memory)
            return out + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling
        # A and B may be fp32 beside a quantized or bf16 base: compute in theirs, add in the output's dtype
        update = self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.t() @ self.lora_B.t()
        return out + (update * self.scaling).to(out.dtype)

    def merged(self):
        """An nn.Linear holding W + B @ A * scaling (W dequantised first for an NF4 base), in W's float dtype."""
        weight = dequantized_weight(self.base)
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                        device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
            out.weight.copy_(weight.float() + delta)
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out


def nf4_linear(linear, compute_dtype=torch.bfloat16):
    """A frozen bitsandbytes Linear4bit holding `linear` in NF4 (4-bit NormalFloat codes in blocks of 64,
    double-quantised scales) that multiplies in compute_dtype: QLoRA's base layer. bf16 where the hardware is fast
    at it; fp32 on CPUs without AMX/AVX512-BF16, where a bf16 matmul is emulated and many times slower."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise SystemExit("QLoRA (quantize='nf4') needs bitsandbytes: pip install bitsandbytes") from None
    weight = linear.weight
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, quant_type="nf4", device="meta")
    # moving a Params4bit to its device is what quantises it (CPU included)
    layer.weight = bnb.nn.Params4bit(weight.detach(), requires_grad=False, quant_type="nf4").to(weight.device)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    return layer


def dequantized_weight(base):
    """The float weight of a LoRA base layer: an nn.Linear's own, or an NF4 layer's decoded in its original dtype."""
    quant_state = getattr(base.weight, "quant_state", None)  # bitsandbytes' Params4bit
    if quant_state is not None:
        import bitsandbytes.functional
        return bitsandbytes.functional.dequantize_4bit(base.weight.data, quant_state)
    if type(base) is not nn.Linear:
        raise TypeError(f"cannot merge LoRA into a {type(base).__name__}: dequantize the base first")
    return base.weight


def _matches(name, targets):
    """PEFT's rule for a list of target modules: the full module name, or its ending after a dot."""
    return any(name == t or name.endswith("." + t) for t in targets)


def _names(names):
    """A comma-separated string or a sequence of module names, with ALIASES spelled out."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    return tuple(ours for n in names for ours in ALIASES.get(n, (n,)))


def add_lora(model, rank=8, alpha=16.0, dropout=0.0, targets=ALL_LINEAR, use_rslora=False, trainable=(),
             quantize=None, compute_dtype=torch.bfloat16):
    """Wrap every linear layer named by `targets` (e.g. "q_proj,v_proj", "layers.0.attn.q_proj", Phi's
    "Wqkv,out_proj,fc1,fc2"; "all" for every projection; lm_head only when named) in a LoRALinear, train the modules
    named by `trainable` in full (e.g. "embed,lm_head"; a tied lm_head is the embedding, so both are saved), and
    freeze all other parameters. quantize="nf4": the wrapped base layers become frozen NF4 layers (QLoRA) that
    multiply in compute_dtype.
    Returns the wrapped module names; model.modules_to_save lists the fully trained ones. A name that picks no
    module is a ValueError listing the model's names, before anything changes."""
    every = targets == "all" or targets == ALL_LINEAR
    targets = ALL_LINEAR if every else _names(targets)
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if quantize not in (None, "nf4"):
        raise ValueError(f"add_lora: quantize={quantize!r}; expected None or 'nf4'")
    linear = [n for n, m in model.named_modules() if hasattr(m, "in_features") and not isinstance(m, LoRALinear)]
    chosen = [n for n in linear if _matches(n, targets)]
    # "all" holds both families' names (LLaMA's gate/up/down_proj, Phi's fc1/fc2): only a list given must match whole
    unknown = [] if every else [t for t in targets if not any(_matches(n, [t]) for n in chosen)]
    if unknown or not chosen:
        names = sorted({n.rpartition(".")[2] for n in linear})
        raise ValueError(f"LoRA targets {unknown or list(targets)} name no linear layer of the model; its linear "
                         f"layers are {names} (or a path such as layers.0.attn.q_proj)")
    full = _trained_in_full(model, _names(trainable))
    both = sorted(set(full) & set(chosen))
    if both:
        tied = " (a tied lm_head is the embedding)" if model.config.tie_embeddings and "lm_head" in both else ""
        raise ValueError(f"{both}: a module is either a LoRA target or trained in full{tied}")
    model.requires_grad_(False)
    for name in full:
        model.get_submodule(name).requires_grad_(True)
    model.modules_to_save = full
    quantized = (lambda linear: nf4_linear(linear, compute_dtype)) if quantize else (lambda linear: linear)
    swap_modules(model, {n: LoRALinear(quantized(model.get_submodule(n)), rank, alpha, dropout, use_rslora)
                         for n in chosen})
    return chosen


def _trained_in_full(model, names):
    """Our module names that `names` pick, both halves of a tied embedding/lm_head pair when one is picked."""
    full = [n for n, m in model.named_modules() if n and _matches(n, names) and _has_weights(m)]
    missing = [t for t in names if not any(_matches(n, [t]) for n in full)]
    if missing:
        names = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if n and _has_weights(m)})
        raise ValueError(f"trainable modules {missing} are not in the model; its modules with weights are {names} "
                         f"(or a path such as layers.0.attn.q_proj)")
    if model.config.tie_embeddings and {"embed", "lm_head"} & set(full):
        full = sorted(set(full) | {"embed", "lm_head"})  # PEFT keeps one copy per name: save both
    return full


def _has_weights(module):
    return next(module.parameters(recurse=False), None) is not None


def lora_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model, dtype=None):
    """Fold every adapter into its layer's weight (dequantising an NF4 base); the model has plain nn.Linear layers
    afterwards, cast to dtype if given, and convert.save_pretrained writes it. An adapter on a tied lm_head unties
    it: lm_head becomes W + B @ A and the embedding stays W, so the merged model computes what the adapted one did
    (peft's merge_and_unload adds the update to the shared matrix, which changes the input embedding too)."""
    layers = lora_layers(model)
    swap_modules(model, {name: layer.merged() for name, layer in layers.items()})
    if "lm_head" in layers:
        model.config.tie_embeddings = False  # its merged layer holds a matrix of its own; save_pretrained writes it
    model.modules_to_save = []
    return model if dtype is None else model.to(dtype)


def lora_state_dict(model):
    """{name: tensor} in model.py's names of everything that trains: the lora_A / lora_B of each LoRA layer and the
    modules trained in full. What a LoRA checkpoint needs to hold."""
    state = {f"{name}.{ab}": getattr(m, ab).detach() for name, m in lora_layers(model).items()
             for ab in ("lora_A", "lora_B")}
    for name in getattr(model, "modules_to_save", []):
        for leaf, p in model.get_submodule(name).named_parameters(recurse=False):
            state[f"{name}.{leaf}"] = p.detach()
    return state


# ----------------------------------------------------------------------------- PEFT adapter folders

def _name_tables(config):
    """(ours -> transformers, transformers -> ours) module-name maps for this model's family."""
    table = convert.NAMES[convert.family_of(config)]
    return {ours: hf for hf, ours in table.items()}, table


def _rename_module(name, table):
    """A module path through one of convert.py's name tables (which map parameters); None when not in it."""
    renamed = convert.rename(name + ".weight", table)
    return renamed and renamed.removesuffix(".weight")


def save_adapter(model, folder, base=""):
    """Write the adapters (and the modules trained in full, as PEFT's modules_to_save) as a PEFT folder; `base` is
    recorded as base_model_name_or_path (use an absolute path or a hub id so the folder loads from anywhere)."""
    from safetensors.torch import save_file
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to save")
    to_hf, _ = _name_tables(model.config)
    tensors, hf_targets = {}, set()
    for name, m in layers.items():
        hf = _rename_module(name, to_hf)
        hf_targets.add(hf.rpartition(".")[2])
        for ab in ("lora_A", "lora_B"):
            tensors[f"base_model.model.{hf}.{ab}.weight"] = getattr(m, ab).detach().to("cpu").contiguous()
    hf_full = set()
    for name in getattr(model, "modules_to_save", []):
        hf = _rename_module(name, to_hf)
        hf_full.add(hf.rpartition(".")[2])
        for leaf, p in model.get_submodule(name).named_parameters(recurse=False):
            # a clone: a tied embedding and lm_head are one tensor, and safetensors refuses shared memory
            tensors[f"base_model.model.{hf}.{leaf}"] = p.detach().to("cpu").clone()
    first = next(iter(layers.values()))
    if any((m.rank, m.alpha, m.use_rslora) != (first.rank, first.alpha, first.use_rslora) for m in layers.values()):
        raise ValueError("adapters of different ranks or alphas in one model: not representable in one "
                         "adapter_config.json")
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": os.fspath(base),
        "r": first.rank, "lora_alpha": first.alpha, "lora_dropout": getattr(first.dropout, "p", 0.0),
        "target_modules": sorted(hf_targets), "modules_to_save": sorted(hf_full) or None, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": first.use_rslora, "inference_mode": True,
    }
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(folder, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2)


def read_adapter_config(folder):
    path = os.path.join(folder, ADAPTER_CONFIG)
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"{path}: cannot read the adapter config: {e}")
    if config.get("peft_type") != "LORA":
        raise SystemExit(f"{path}: peft_type {config.get('peft_type')!r}; only LORA adapters are supported")
    for key, off in (("use_dora", False), ("fan_in_fan_out", False), ("rank_pattern", {}), ("alpha_pattern", {}),
                     ("layers_to_transform", None)):
        if config.get(key) not in (None, off):
            raise SystemExit(f"{path}: {key}={config[key]!r} is not supported (only plain LoRA on linear layers)")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise SystemExit(f"{path}: field {key!r} missing")
    return config


def load_adapter(model, folder):
    """Add the adapters of a PEFT LoRA folder to `model` (whose weights must be the adapter's base), with its
    modules_to_save; embeddings saved with more rows (added tokens) grow the model's first."""
    from safetensors.torch import load_file
    config = read_adapter_config(folder)
    targets = config["target_modules"]
    if isinstance(targets, str) and targets != "all-linear":  # PEFT also takes a regex; we take lists
        raise SystemExit(f"{folder}: target_modules regex {targets!r} is not supported; list the module names")
    to_hf, from_hf = _name_tables(model.config)
    # the targets name transformers' modules: pick ours whose transformers name they match
    linear = [n for n, m in model.named_modules() if hasattr(m, "in_features")]
    ours = [n for n in linear if n != "lm_head"] if targets == "all-linear" else \
        [n for n in linear if _matches(_rename_module(n, to_hf) or n, targets)]
    if not ours:
        raise SystemExit(f"{folder}: target_modules {targets} match no linear layer of the base model")
    full_names = config.get("modules_to_save") or []
    full = [n for n, m in model.named_modules() if n and _has_weights(m)
            and _matches(_rename_module(n, to_hf) or n, full_names)]
    unknown = [t for t in full_names if not any(_matches(_rename_module(n, to_hf) or n, [t]) for n in full)]
    if unknown:
        raise SystemExit(f"{folder}: modules_to_save {unknown} name no module of the base model")
    path = os.path.join(folder, ADAPTER_WEIGHTS)
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: adapter weights missing (only safetensors adapters are read)")
    tensors = load_file(path)
    embed = tensors.get(f"base_model.model.{_rename_module('embed', to_hf)}.weight")
    if embed is not None and embed.shape[0] > model.config.vocab_size:
        resize_embeddings(model, embed.shape[0], multiple_of=1)  # the adapter was trained with added tokens
    add_lora(model, config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0), ours,
             config.get("use_rslora", False), trainable=full)
    layers = lora_layers(model)
    wanted = {f"{n}.{ab}": getattr(m, ab) for n, m in layers.items() for ab in ("lora_A", "lora_B")}
    wanted.update({f"{n}.{leaf}": p for n in model.modules_to_save
                   for leaf, p in model.get_submodule(n).named_parameters(recurse=False)})
    loaded = set()
    for key, tensor in tensors.items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.(lora_A|lora_B)(?:\.\w+)?\.weight", key)  # [.adapter name]
        m = m or re.fullmatch(r"base_model\.model\.(.+)\.(\w+)", key)  # a module trained in full
        module = m and _rename_module(m.group(1), from_hf)
        name = module and f"{module}.{m.group(2)}"
        if name not in wanted:
            raise SystemExit(f"{path}: tensor {key!r} is neither a LoRA layer nor a module_to_save of this base model")
        param = wanted[name]
        if tuple(tensor.shape) != tuple(param.shape):
            raise SystemExit(f"{path}: {key} has shape {tuple(tensor.shape)}, the base model needs "
                             f"{tuple(param.shape)}: is base_model_name_or_path the adapter's base?")
        with torch.no_grad():
            param.copy_(tensor)
        loaded.add(id(param))
    missing = [n for n, p in wanted.items() if id(p) not in loaded]  # by tensor: a tied lm_head is the embedding
    if missing:
        raise SystemExit(f"{path}: no weights for {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    return model


def load(folder, base=None, device=None, dtype=None, merge=False):
    """A Transformer with the adapter of `folder` on its base (`base`, else the adapter config's
    base_model_name_or_path; a relative path is tried from the adapter folder, then from the working directory)."""
    config = read_adapter_config(folder)
    base = base or config.get("base_model_name_or_path") or ""
    if not base:
        raise SystemExit(f"{folder}: the adapter names no base model; pass the base checkpoint (--lora_base=PATH)")
    candidates = [base] if os.path.isabs(base) else [os.path.join(folder, base), base]
    found = next((c for c in candidates if os.path.exists(c)), None)
    if found is None:
        raise SystemExit(f"{folder}: base model {base!r} not found (tried {candidates}); pass it with "
                         f"--lora_base=PATH (hub ids are not downloaded)")
    model = convert.from_pretrained(found, device=device, dtype=dtype)
    load_adapter(model, folder)
    return (merge_lora(model) if merge else model), found


@contextmanager
def adapters_off(model):
    """The model with every LoRA layer running its frozen base alone: the starting model of a LoRA/QLoRA run,
    without a second copy. (A plain model is left as it is.)"""
    layers = list(lora_layers(model).values())
    for layer in layers:
        layer.forward = layer.base.forward  # an instance attribute shadows LoRALinear.forward
    try:
        yield model
    finally:
        for layer in layers:
            del layer.forward
