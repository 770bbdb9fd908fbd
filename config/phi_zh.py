# `bash run.sh zh`'s pretraining: a small Phi-2-style model (LayerNorm, GELU MLP, parallel attention + MLP, partial
# rotary, biases, untied lm_head; its hf/ loads in transformers as PhiForCausalLM) on ~2.3M characters of Chinese
# news and reviews with an 8000-id byte-fallback BPE: ~3M parameters (2M of them the two embedding tables), about
# four minutes on one CPU core. config/phi_zh_gpu.py is the same recipe at a GPU's size.
out_dir = "out/phi_zh"
family = "phi"
dim = 128
n_layers = 4
n_heads = 4
partial_rotary_factor = 0.5   # Phi-2 rotates 32 of its 80 head features; here 16 of 32
tie_embeddings = False
batch_size = 8
block_size = 256              # SFT's and RAG's prompts and answers need the room
max_iters = 450
learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 30
eval_interval = 100
eval_iters = 8
log_interval = 20
dtype = "auto"                # bf16 where the hardware runs it fast, else float32 (inference.resolve_dtype)
