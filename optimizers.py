"""The trainer's optimizers: `optimizer=adamw` (every parameter) or `optimizer=muon` (torch.optim.Muon for the hidden
matrices, AdamW for the rest), built by make_optimizer and stepped, checkpointed and resumed as one optimizer.

Muon (Keller Jordan, 2024; torch >= 2.9) replaces each hidden matrix's momentum by its nearest semi-orthogonal
matrix (5 Newton-Schulz iterations in bf16), so every direction of the update moves at the same rate. It is meant
for the 2-D weights inside the blocks: the attention and MLP projections. Embeddings and lm_head (tied or not:
tables of token rows, not maps between hidden states), norms and biases stay with AdamW, as in Keller's and
Moonshot's recipes. LoRA's A and B stay with AdamW too: the update that
matters is their product B @ A, which orthogonalising each thin factor does not orthogonalise (and B starts at
zero); a LoRA run uses Muon only for hidden matrices trained in full (`trainable`), and is refused without any.

Learning rate: adjust_lr_fn="match_rms_adamw" (Moonshot's "Muon is Scalable for LLM Training", 2025) scales each
matrix's step to 0.2 * lr * sqrt(max(rows, cols)), which gives the update the RMS of a typical AdamW update, so one
learning_rate, schedule and weight_decay serve both halves and a config switches optimizer with one key. Muon's
momentum is torch's (and Keller's) 0.95 with Nesterov.
"""
import torch

OPTIMIZERS = ("adamw", "muon")
LORA_FACTORS = ("lora_A", "lora_B")


def check_optimizer(c):
    """Refuse a Muon run that cannot work, before any work: a torch without it, or sharded parameters."""
    if c.optimizer != "muon":
        return
    if not hasattr(torch.optim, "Muon"):
        raise SystemExit(f"optimizer=muon needs torch.optim.Muon (torch 2.9 or newer); this is torch "
                         f"{torch.__version__}: upgrade torch or use optimizer=adamw")
    why = {"fsdp": "FSDP2 makes every matrix a sharded DTensor, which Muon's Newton-Schulz would gather each step, "
                   "and its sharded checkpoints take one torch optimizer, not AdamW + Muon",
           "deepspeed": "ZeRO flattens the matrices into 1-D partitions, and Muon orthogonalises whole matrices"}
    if c.parallel in why:
        raise SystemExit(f"optimizer=muon does not run under parallel={c.parallel}: {why[c.parallel]}; use "
                         f"parallel=ddp or optimizer=adamw")


def hidden_matrices(model):
    """{name: parameter} of what Muon trains: the trainable 2-D weights inside the blocks, LoRA factors excepted."""
    return {f"layers.{name}": p for name, p in model.layers.named_parameters()
            if p.requires_grad and p.dim() == 2 and name.rsplit(".", 1)[-1] not in LORA_FACTORS}


def adamw(params, c, device):
    """AdamW, decaying matrices only (weights of linears and embeddings); fused kernels where torch has them.
    Its param_groups are [decayed, not decayed]."""
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": c.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = device.type in ("cuda", "cpu")
    try:
        return torch.optim.AdamW(groups, lr=c.learning_rate, betas=(c.beta1, c.beta2), fused=fused)
    except (RuntimeError, TypeError):  # an older torch without the fused kernel for this device
        return torch.optim.AdamW(groups, lr=c.learning_rate, betas=(c.beta1, c.beta2))


class MuonWithAdamW:
    """Muon for the hidden matrices and AdamW for the rest as one optimizer: param_groups are AdamW's two and then
    Muon's one (the trainer sets lr and weight decay on each), state_dict holds both, step steps both."""

    def __init__(self, adamw, muon):
        self.adamw, self.muon = adamw, muon

    @property
    def param_groups(self):  # a property: load_state_dict replaces each optimizer's list
        return self.adamw.param_groups + self.muon.param_groups

    def step(self):
        self.adamw.step()
        self.muon.step()

    def zero_grad(self, set_to_none=True):
        self.adamw.zero_grad(set_to_none=set_to_none)
        self.muon.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state):
        self.adamw.load_state_dict(state["adamw"])
        self.muon.load_state_dict(state["muon"])


def set_hyperparameters(optimizer, lr, c):
    """This step's learning rate and the config's weight decay and betas on every group, in make_optimizer's order:
    AdamW's decayed and not decayed groups, then Muon's (matrices: decayed; no betas). DeepSpeed's ZeRO wrapper
    exposes AdamW's two groups the same way."""
    for group, decay in zip(optimizer.param_groups, (c.weight_decay, 0.0, c.weight_decay)):
        group.update(lr=lr, weight_decay=decay)
        if "betas" in group:
            group["betas"] = (c.beta1, c.beta2)


def check_same_optimizer(saved_config, c, path):
    """A checkpoint's optimizer state fits only the optimizer that wrote it (runs from before the key: AdamW)."""
    saved = saved_config.get("optimizer", "adamw")
    if saved != c.optimizer:
        raise SystemExit(f"{path}: saved with optimizer={saved}; resume it with --optimizer={saved}")


def make_optimizer(model, c, device):
    """The optimizer c.optimizer names, over the model's trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if c.optimizer == "adamw":
        return adamw(params, c, device)
    hidden = {id(p) for p in hidden_matrices(model).values()}
    if not hidden:
        raise SystemExit("optimizer=muon: no hidden matrix trains in this run (LoRA's A and B stay with AdamW, see "
                         "optimizers.py); use optimizer=adamw, or train some projections in full with `trainable`")
    muon = torch.optim.Muon([p for p in params if id(p) in hidden], lr=c.learning_rate, weight_decay=c.weight_decay,
                            adjust_lr_fn="match_rms_adamw")
    return MuonWithAdamW(adamw([p for p in params if id(p) not in hidden], c, device), muon)

