"""LoRA (Hu et al. 2021): train a low-rank update B @ A beside each frozen linear layer instead of the layer itself.

    y = base(x) + (dropout(x) @ A.T @ B.T) * alpha / r          A: (r, in), random;  B: (out, r), zeros at start

so the adapted model starts out equal to the base. Only A and B train; merging folds the update into the weight
(W + B @ A * alpha / r) and the model is a plain Transformer again.

Adapters are saved as PEFT folders (adapter_config.json + adapter_model.safetensors with transformers' module
names), so an adapter trained here loads with peft.PeftModel on the transformers model, and one trained with peft
on a transformers LLaMA/Phi loads here:

    model, base = lora.load(adapter_dir)                   # the base from adapter_config.json's base_model_name_or_path
    model, base = lora.load(adapter_dir, base="base_dir")  # or a base named here (a folder or a .gguf)
    lora.add_lora(model, rank=8, alpha=16)                 # fresh adapters on a model; freezes everything else
    lora.save_adapter(model, out_dir, base="base_dir")
    lora.merge_lora(model)                                 # back to plain nn.Linear layers
"""
import json
import math
import os
import re

import torch
import torch.nn as nn

import convert
from model import swap_modules

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "fc1", "fc2")


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
        # A and B may be fp32 beside a quantized or bf16 base: compute in theirs, add in x's dtype
        update = self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.t() @ self.lora_B.t()
        return self.base(x) + (update * self.scaling).to(x.dtype)

    def merged(self):
        """An nn.Linear holding W + B @ A * scaling."""
        if not isinstance(self.base, nn.Linear):
            raise TypeError(f"cannot merge LoRA into a {type(self.base).__name__}: dequantize the base first")
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                        device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
            out.weight.copy_(self.base.weight.float() + delta)
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out


def _matches(name, targets):
    """PEFT's rule for a list of target modules: the full module name, or its ending after a dot."""
    return any(name == t or name.endswith("." + t) for t in targets)


def add_lora(model, rank=8, alpha=16.0, dropout=0.0, targets=ALL_LINEAR, use_rslora=False):
    """Wrap every linear layer named by `targets` (e.g. "q_proj,v_proj", "layers.0.attn.q_proj"; "all" for every
    projection; lm_head only when named) and freeze all other parameters. Returns the wrapped module names."""
    if isinstance(targets, str):
        targets = ALL_LINEAR if targets == "all" else tuple(t.strip() for t in targets.split(",") if t.strip())
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    model.requires_grad_(False)
    chosen = [name for name, m in model.named_modules()
              if _matches(name, targets) and hasattr(m, "in_features") and not isinstance(m, LoRALinear)]
    if not chosen:
        names = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if hasattr(m, "in_features")})
        raise ValueError(f"no linear layer named {list(targets)} in the model; its linear layers are {names}")
    swap_modules(model, {n: LoRALinear(model.get_submodule(n), rank, alpha, dropout, use_rslora) for n in chosen})
    return chosen


def lora_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model):
    """Fold every adapter into its layer's weight; the model has plain nn.Linear layers afterwards."""
    swap_modules(model, {name: layer.merged() for name, layer in lora_layers(model).items()})
    return model


def lora_state_dict(model):
    """{module.lora_A / module.lora_B: tensor} in model.py's names: what a LoRA checkpoint needs to hold."""
    return {f"{name}.{ab}": getattr(m, ab).detach() for name, m in lora_layers(model).items()
            for ab in ("lora_A", "lora_B")}


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
    """Write the adapters as a PEFT folder; `base` is recorded as base_model_name_or_path (use an absolute path or
    a hub id so the folder can be loaded from anywhere)."""
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
    first = next(iter(layers.values()))
    if any((m.rank, m.alpha, m.use_rslora) != (first.rank, first.alpha, first.use_rslora) for m in layers.values()):
        raise ValueError("adapters of different ranks or alphas in one model: not representable in one "
                         "adapter_config.json")
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": os.fspath(base),
        "r": first.rank, "lora_alpha": first.alpha, "lora_dropout": getattr(first.dropout, "p", 0.0),
        "target_modules": sorted(hf_targets), "bias": "none",
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
                     ("layers_to_transform", None), ("modules_to_save", None)):
        if config.get(key) not in (None, off):
            raise SystemExit(f"{path}: {key}={config[key]!r} is not supported (only plain LoRA on linear layers)")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise SystemExit(f"{path}: field {key!r} missing")
    return config


def load_adapter(model, folder):
    """Add the adapters of a PEFT LoRA folder to `model` (whose weights must be the adapter's base)."""
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
    add_lora(model, config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0), ours,
             config.get("use_rslora", False))
    path = os.path.join(folder, ADAPTER_WEIGHTS)
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: adapter weights missing (only safetensors adapters are read)")
    layers = lora_layers(model)
    loaded = set()
    for key, tensor in load_file(path).items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.(lora_A|lora_B)(?:\.\w+)?\.weight", key)  # [.adapter name]
        ours = m and _rename_module(m.group(1), from_hf)
        if ours not in layers:
            raise SystemExit(f"{path}: tensor {key!r} does not belong to a LoRA layer of this base model")
        ab = m.group(2)
        param = getattr(layers[ours], ab)
        if tuple(tensor.shape) != tuple(param.shape):
            raise SystemExit(f"{path}: {key} has shape {tuple(tensor.shape)}, the base model needs "
                             f"{tuple(param.shape)}: is base_model_name_or_path the adapter's base?")
        with torch.no_grad():
            param.copy_(tensor)
        loaded.add((ours, ab))
    missing = [f"{n}.{ab}" for n in layers for ab in ("lora_A", "lora_B") if (n, ab) not in loaded]
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
