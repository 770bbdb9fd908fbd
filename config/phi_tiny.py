# A small Phi-2-style model (LayerNorm, GELU MLP, parallel attention + MLP, partial rotary, biases, untied
# lm_head): the shape of the Chinese Phi-2 project's own model, at a size that trains in minutes on 2 CPU cores.
# Its hf/ export loads in transformers as PhiForCausalLM.
#   python pretrain.py config/phi_tiny.py --data_dir=data/pydocs
out_dir = "out/phi_tiny"
family = "phi"
dim = 128
n_layers = 4
n_heads = 4
partial_rotary_factor = 0.5   # Phi-2 rotates 32 of its 80 head features; here 16 of 32
tie_embeddings = False
batch_size = 12
block_size = 128
max_iters = 600
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 30
eval_interval = 100
eval_iters = 4
log_interval = 20
dtype = "bfloat16"
