# The shape of a small Phi-2-style model (LayerNorm, GELU MLP, parallel attention + MLP, partial rotary, biases,
# untied lm_head): the Chinese Phi-2 project's own architecture, small. Only the model: put it after a config that
# sets the training, e.g. run.sh's:
#   python pretrain.py config/pydocs.py config/phi_tiny.py --data_dir=out/run/data
# Its hf/ export loads in transformers as PhiForCausalLM.
out_dir = "out/phi_tiny"
family = "phi"
dim = 128
n_layers = 4
n_heads = 4
partial_rotary_factor = 0.5   # Phi-2 rotates 32 of its 80 head features; here 16 of 32
tie_embeddings = False
