"""One tokenizer interface for every script: our sentencepiece models and imported checkpoints' tokenizers.

    tok = Tokenizer.from_pretrained("out/tokenizer")        # tokenizer.model (ours) or tokenizer.json
    tok = Tokenizer.from_pretrained("model.Q4_1.gguf")      # the tokenizer a GGUF carries in its metadata
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>\n")    # special-token strings map to their ids
    text = tok.decode(ids)

Two backends sit behind it. Our own tokenizers are sentencepiece models (train_tokenizer.py); an imported checkpoint
brings a `tokenizers` tokenizer.json, or a GGUF whose metadata we rebuild into one of the two. save_pretrained always
writes a tokenizer.json + tokenizer_config.json as well, so `transformers.AutoTokenizer` loads the same ids.
"""
import functools
import hashlib
import json
import os
import re

import sentencepiece as spm
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The prompt format of the Chinese Phi-2 projects: each answer ends with EOS (what stops generation). A system prompt,
# which that format has no place for, is a first plain line.
QA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '##Question:\n' + message['content'] + '\n' }}"
    "{% else %}{{ '##Answer:\n' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '##Answer:\n' }}{% endif %}"
)

# Text whose ids go into Tokenizer.checksum: Chinese, odd whitespace, digits, emoji, markup and ChatML markers.
_PROBE = ("<|im_start|>user\n床前明月光，疑是地上霜。 Hello,  world!\t\tTabs,\r\nnew lines\n\n\n   and  "
          "spaces x  1234 = 56.7; ünïcode ﬁ Ａ１ 😀👩‍👩‍👧 def f(x):\n    return x ** 2<|im_end|>\n</s>")

# sentencepiece piece types; GGUF's tokenizer.ggml.token_type uses the same numbers.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizers of byte-level BPE GGUFs, by tokenizer.ggml.pre (llama.cpp's names and regexes, llama-vocab.cpp).
# SmolLM's, like StarCoder's, splits every digit off before the GPT-2 split: SmolLM2's vocabulary has no multi-digit
# token. transformers' GGUF loader does not know "smollm" and splits GPT-2 style only, which differs for text such
# as "x  1" (a run of spaces before a digit); we follow llama.cpp and the model's own tokenizer.json.
_GPT2_SPLIT = ("gpt2", "mpt", "olmo")
_DIGITS_THEN_GPT2_SPLIT = ("smollm", "starcoder", "refact", "codeshell")


class ChatTemplateError(ValueError):
    """A chat template that does not compile or render, or leaves jinja2's sandbox; the message names its file."""


def load_tokenizer(path):
    """Tokenizer.from_pretrained for a script's own process: a chat template that cannot be used stops the run
    with the error's one line (it names the file). Not in worker processes, where a SystemExit is lost."""
    try:
        return Tokenizer.from_pretrained(path)
    except ChatTemplateError as e:
        raise SystemExit(str(e)) from None


class Tokenizer:
    """Use Tokenizer.from_pretrained(path); see the module docstring and notes/tokenizer_contract.md."""

    def __init__(self, *, sp_model=None, hf=None, special_tokens, bos, eos, pad, unk, chat_template=None,
                 template_source=None):
        assert (sp_model is None) != (hf is None), "exactly one backend"
        self.sp_model = sp_model  # the serialized sentencepiece ModelProto (bytes), or None
        self.sp = spm.SentencePieceProcessor(model_proto=sp_model) if sp_model is not None else None
        self.hf = hf
        self.special_tokens = dict(special_tokens)
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos, eos, pad, unk
        self.chat_template = chat_template or CHATML_TEMPLATE
        self.template_source = template_source or "built-in"  # the file it came from, for messages
        self._special_ids = {i: s for s, i in self.special_tokens.items()}
        # sentencepiece never matches control pieces in text, so we cut the text at special tokens ourselves
        # (longest first, as `tokenizers` does with its added tokens).
        names = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None
        self._checksum = None
        # A template that cannot render the simplest prompt, or reaches for Python internals, stops the load.
        self.apply_chat_template([{"role": "user", "content": "Hi"}])

    # ---- loading ------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path):
        """A folder holding tokenizer.model (preferred) or tokenizer.json, or a .gguf file."""
        if not os.path.exists(path):
            raise FileNotFoundError(f"tokenizer not found: {path}")
        if os.path.isfile(path):
            if path.endswith(".gguf"):
                return cls.from_gguf(path)
            raise ValueError(f"{path}: not a tokenizer; pass a folder holding tokenizer.model or tokenizer.json, "
                             f"or a .gguf file")
        config = _read_tokenizer_config(path)
        if os.path.isfile(os.path.join(path, "tokenizer.model")):
            with open(os.path.join(path, "tokenizer.model"), "rb") as f:
                return cls.from_sentencepiece(f.read(), config.get("chat_template"), where=path,
                                              template_source=config.get("chat_template_file"))
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            json_path = os.path.join(path, "tokenizer.json")
            try:
                hf = HFTokenizer.from_file(json_path)
            except Exception as e:
                raise ValueError(f"{json_path}: cannot load: {e}") from None
            ids = {}
            for name in ("bos", "eos", "pad", "unk"):
                token = config.get(f"{name}_token")
                token = token.get("content") if isinstance(token, dict) else token
                ids[name] = hf.token_to_id(token) if token else None
                if token and ids[name] is None:
                    raise ValueError(f"{path}/tokenizer_config.json: {name}_token {token!r} is not in tokenizer.json")
            specials = {t.content: i for i, t in hf.get_added_tokens_decoder().items() if t.special}
            specials.update({hf.id_to_token(i): i for i in ids.values() if i is not None})
            return cls(hf=hf, special_tokens=specials, chat_template=config.get("chat_template"),
                       template_source=config.get("chat_template_file"), **ids)
        raise FileNotFoundError(f"{path}: no tokenizer.model or tokenizer.json in this folder")

    @classmethod
    def from_sentencepiece(cls, model_bytes, chat_template=None, where="<bytes>", template_source=None):
        try:
            sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        except Exception as e:
            raise ValueError(f"{where}: not a sentencepiece model: {e}") from None
        n = sp.get_piece_size()
        specials = {sp.id_to_piece(i): i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)}
        ids = {name: (i if 0 <= i < n else None)
               for name, i in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("pad", sp.pad_id()), ("unk", sp.unk_id()))}
        return cls(sp_model=model_bytes, special_tokens=specials, chat_template=chat_template,
                   template_source=template_source or where, **ids)

    @classmethod
    def from_gguf(cls, path):
        """The tokenizer in a GGUF's metadata (llama.cpp's keys): "gpt2" byte-level BPE or "llama" sentencepiece."""
        meta = _read_gguf_tokenizer(path)
        kind, tokens = meta.get("tokenizer.ggml.model"), meta["tokenizer.ggml.tokens"]
        types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
        ids = {name: meta.get(f"tokenizer.ggml.{key}_token_id")
               for name, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown"))}
        template = meta.get("tokenizer.chat_template")
        if kind == "llama":
            scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
            proto = _spm_proto_from_vocab(tokens, scores, types, ids,
                                          add_dummy_prefix=meta.get("tokenizer.ggml.add_space_prefix", True))
            return cls.from_sentencepiece(proto, template, where=path,
                                          template_source=f"{path} (tokenizer.chat_template)")
        if kind != "gpt2":
            raise ValueError(f"{path}: GGUF tokenizer.ggml.model {kind!r} is not supported (only 'gpt2' and 'llama')")
        pre = meta.get("tokenizer.ggml.pre")
        if pre in _DIGITS_THEN_GPT2_SPLIT:
            pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
        elif pre in _GPT2_SPLIT:
            pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        else:
            raise ValueError(f"{path}: GGUF pre-tokenizer {pre!r} is not supported (known: "
                             f"{', '.join(_GPT2_SPLIT + _DIGITS_THEN_GPT2_SPLIT)}); load the model's tokenizer.json "
                             f"folder instead")
        merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
        hf = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
        hf.pre_tokenizer = pre_tokenizer
        hf.decoder = decoders.ByteLevel()
        # CONTROL tokens (<|im_start|> ...) are special: matched whole in text, skipped by decode(skip_special=True);
        # USER_DEFINED ones are matched whole too but are ordinary text.
        hf.add_special_tokens([AddedToken(t, special=True, normalized=False)
                               for t, ty in zip(tokens, types) if ty == CONTROL])
        hf.add_tokens([AddedToken(t, special=False, normalized=False)
                       for t, ty in zip(tokens, types) if ty == USER_DEFINED])
        specials = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == CONTROL}
        specials.update({tokens[i]: i for i in ids.values() if i is not None})
        return cls(hf=hf, special_tokens=specials, chat_template=template,
                   template_source=f"{path} (tokenizer.chat_template)", **ids)

    # ---- the interface ------------------------------------------------------------------------------------------

    @property
    def vocab_size(self):
        return self.sp.get_piece_size() if self.sp is not None else self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def stop_ids(self):
        """Ids that end a chat reply: EOS, and <|im_end|> where the vocabulary has it."""
        ids = {self.eos_id, self.special_tokens.get(IM_END)}
        return sorted(i for i in ids if i is not None)

    def encode(self, text, bos=False, eos=False):
        return self.encode_batch([text], bos=bos, eos=eos)[0]

    def encode_batch(self, texts, bos=False, eos=False):
        if bos and self.bos_id is None or eos and self.eos_id is None:
            raise ValueError("this tokenizer has no " + ("BOS" if bos and self.bos_id is None else "EOS") + " token")
        if self.hf is not None:
            batch = [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]
        else:
            batch = self._sp_encode_batch(texts)
        head, tail = [self.bos_id] if bos else [], [self.eos_id] if eos else []
        return [head + ids + tail for ids in batch] if head or tail else batch

    def _sp_encode_batch(self, texts):
        # Cut every text at its special tokens; odd positions of re.split's result are the specials themselves.
        parts = [self._special_re.split(t) if self._special_re else [t] for t in texts]
        plain = [p for ps in parts for p in ps[0::2] if p]
        encoded = iter(self.sp.encode(plain) if plain else [])
        batch = []
        for ps in parts:
            ids = []
            for j, p in enumerate(ps):
                if j % 2:
                    ids.append(self.special_tokens[p])
                elif p:
                    ids.extend(next(encoded))
            batch.append(ids)
        return batch

    def decode(self, ids, skip_special=False):
        ids = [int(i) for i in ids]
        if self.hf is not None:
            return self.hf.decode(ids, skip_special_tokens=skip_special)
        # sentencepiece decodes control pieces to "", so decode the runs between specials and put the specials back.
        out, run = [], []
        for i in ids:
            if i in self._special_ids:
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                if not skip_special:
                    out.append(self._special_ids[i])
            else:
                run.append(i)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    def apply_chat_template(self, messages, add_generation_prompt=True):
        """Render [{"role", "content"}] with the jinja2 chat template, as transformers' apply_chat_template does,
        in jinja2's immutable sandbox (a template comes with a downloaded model). A template that does not compile
        or render, or that reaches for Python internals, is a ChatTemplateError naming the file it came from."""
        from jinja2.sandbox import SecurityError
        for k, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"message {k}: expected {{'role': ..., 'content': ...}}, got {m!r}")
        name = {i: s for s, i in self.special_tokens.items()}
        try:
            return _sandboxed_template(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=name.get(self.bos_id, ""), eos_token=name.get(self.eos_id, ""))
        except SecurityError as e:
            raise ChatTemplateError(f"{self.template_source}: the chat template reaches for Python internals, which "
                                    f"is refused ({e}); replace or remove its chat_template") from None
        except Exception as e:  # jinja2's errors, the template's raise_exception(), whatever its code runs into
            line = f" (template line {e.lineno})" if getattr(e, "lineno", None) else ""
            raise ChatTemplateError(f"{self.template_source}: the chat template cannot be used: "
                                    f"{type(e).__name__}: {e}{line}") from None

    def checksum(self):
        """sha256 of what decides the ids: the vocabulary (pieces with their scores and types, or tokens, merges and
        added tokens), the normalisation, the special ids, and the ids of a probe text. Not the file's bytes: the
        same tokenizer read back from a GGUF we exported (a rebuilt sentencepiece model, the embedding's padding
        ids as placeholders) has the same checksum, so data made with it still fits the model."""
        if self._checksum is None:  # a Tokenizer never changes (add_special_tokens makes a new one)
            self._checksum = self._canonical_checksum()
        return self._checksum

    def _canonical_checksum(self):
        n = self.vocab_size
        while n and self._piece(n - 1) == f"[PAD{n - 1}]":  # gguf_export's (and llama.cpp's) padding ids
            n -= 1
        if self.sp is not None:
            from sentencepiece import sentencepiece_model_pb2 as pb  # needs protobuf
            proto = pb.ModelProto.FromString(self.sp_model)
            spec, norm = proto.trainer_spec, proto.normalizer_spec
            vocab = {"pieces": [[p.piece, p.score, p.type] for p in proto.pieces[:n]],
                     "model": [spec.model_type, spec.byte_fallback, spec.treat_whitespace_as_suffix],
                     "normalizer": [norm.precompiled_charsmap.hex(), norm.add_dummy_prefix,
                                    norm.remove_extra_whitespaces, norm.escape_whitespaces]}
        else:
            model = json.loads(self.hf.to_str())["model"]
            vocab = {"tokens": [self._piece(i) for i in range(n)],
                     "model": {k: v for k, v in model.items() if k not in ("vocab", "merges")},  # type, options
                     "merges": [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])],
                     "added": sorted([t.content, i, t.special] for i, t in self.hf.get_added_tokens_decoder().items()
                                     if i < n)}
        vocab["special_ids"] = [self.bos_id, self.eos_id, self.pad_id, self.unk_id]
        vocab["probe"] = self.encode(_PROBE)  # what the fields above may miss (a pre-tokenizer, a normaliser rule)
        return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()

    def with_chat_template(self, template):
        """This tokenizer with another chat template (the ids, and so the checksum, stay the same)."""
        return Tokenizer(sp_model=self.sp_model, hf=self.hf, special_tokens=self.special_tokens, bos=self.bos_id,
                         eos=self.eos_id, pad=self.pad_id, unk=self.unk_id, chat_template=template)

    def add_special_tokens(self, tokens):
        """A new tokenizer with `tokens` as special tokens at new ids after the vocabulary, each encoded as a single
        id (ChatML's markers on a tokenizer without them); this one is left as it is. Its checksum differs."""
        for t in tokens:
            if t in self.special_tokens or self._piece_id(t) is not None:
                raise ValueError(f"{t!r} is already in the vocabulary")
        if len(set(tokens)) != len(tokens):
            raise ValueError(f"duplicate tokens in {tokens}")
        new_ids = {t: self.vocab_size + k for k, t in enumerate(tokens)}
        sp_model = hf = None
        if self.sp is not None:  # control pieces, as train_tokenizer.py makes ChatML's: never produced by BPE merges
            from sentencepiece import sentencepiece_model_pb2 as pb  # needs protobuf
            proto = pb.ModelProto.FromString(self.sp_model)
            for t in tokens:
                proto.pieces.add(piece=t, score=0.0, type=CONTROL)
            proto.trainer_spec.vocab_size = len(proto.pieces)
            sp_model = proto.SerializeToString()
        else:
            hf = HFTokenizer.from_str(self.hf.to_str())
            hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
            got = {t: hf.token_to_id(t) for t in tokens}
            if got != new_ids:  # a tokenizer.json whose added tokens leave holes in the ids
                raise ValueError(f"the new tokens got ids {got}, not the next ones after the vocabulary {new_ids}")
        return Tokenizer(sp_model=sp_model, hf=hf, special_tokens={**self.special_tokens, **new_ids}, bos=self.bos_id,
                         eos=self.eos_id, pad=self.pad_id, unk=self.unk_id, chat_template=self.chat_template,
                         template_source=self.template_source)

    def _piece(self, i):
        return self.sp.id_to_piece(i) if self.sp is not None else self.hf.id_to_token(i)

    def _piece_id(self, token):
        """The id of `token` as one entry of the vocabulary, or None."""
        if self.sp is None:
            return self.hf.token_to_id(token)
        i = self.sp.piece_to_id(token)  # the unknown piece's id when it has none
        return i if self.sp.id_to_piece(i) == token else None

    def save_pretrained(self, out_dir):
        """tokenizer.model (sentencepiece), tokenizer.json and tokenizer_config.json: AutoTokenizer gives our ids."""
        os.makedirs(out_dir, exist_ok=True)
        if self.sp is not None:
            with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
                f.write(self.sp_model)
        hf = self.hf if self.hf is not None else _tokenizers_from_spm(self.sp_model)
        hf.save(os.path.join(out_dir, "tokenizer.json"))
        name = {i: s for s, i in self.special_tokens.items()}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",  # use tokenizer.json as is, never a rebuilt slow tokenizer
            "bos_token": name.get(self.bos_id), "eos_token": name.get(self.eos_id),
            "pad_token": name.get(self.pad_id), "unk_token": name.get(self.unk_id),
            "add_bos_token": False, "add_eos_token": False,  # like encode(): the caller asks for BOS/EOS
            "clean_up_tokenization_spaces": False,  # decode must give back the exact text
            "chat_template": self.chat_template,
        }
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, ensure_ascii=False, indent=2)


# ---- helpers ------------------------------------------------------------------------------------------------------

def tokenizer_in(path):
    """Whether `path` holds a tokenizer Tokenizer.from_pretrained reads: a folder with tokenizer.model or
    tokenizer.json, or a .gguf file (its embedded tokenizer)."""
    if str(path).endswith(".gguf"):
        return os.path.isfile(path)
    return any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.model", "tokenizer.json"))


@functools.lru_cache(maxsize=16)
def _sandboxed_template(template):
    """A chat template compiled in jinja2's ImmutableSandboxedEnvironment, as transformers compiles them: no
    attribute of Python's internals (''.__class__.__mro__ ...), no mutation of the values it is given. Cached
    here rather than on the Tokenizer, which stays picklable."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def _read_tokenizer_config(folder):
    """tokenizer_config.json (+ special_tokens_map.json, chat_template.jinja as transformers writes them), or {};
    chat_template_file names the file the chat template came from."""
    config = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    loaded = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
            config.update(loaded)
            if "chat_template" in loaded:
                config["chat_template_file"] = path
    jinja_path = os.path.join(folder, "chat_template.jinja")
    if "chat_template" not in config and os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            config["chat_template"] = f.read()
        config["chat_template_file"] = jinja_path
    if isinstance(config.get("chat_template"), list):  # several named templates: take the default one
        config["chat_template"] = {t["name"]: t["template"] for t in config["chat_template"]}.get("default")
    return config


def _read_gguf_tokenizer(path):
    """The tokenizer.* metadata of a GGUF file as plain Python values."""
    from gguf import GGUFReader
    try:
        reader = GGUFReader(path)
    except Exception as e:
        raise ValueError(f"{path}: cannot read GGUF: {e}") from None
    meta = {key: field.contents() for key, field in reader.fields.items() if key.startswith("tokenizer.")}
    if "tokenizer.ggml.tokens" not in meta:
        raise ValueError(f"{path}: this GGUF carries no tokenizer (no tokenizer.ggml.tokens)")
    return meta


def _spm_proto_from_vocab(tokens, scores, types, ids, add_dummy_prefix):
    """A sentencepiece BPE model from llama.cpp's "llama" vocabulary: pieces, scores and types are all it needs,
    and sentencepiece's BPE merges by piece score exactly as llama.cpp's SPM tokenizer does."""
    from sentencepiece import sentencepiece_model_pb2 as pb  # needs protobuf
    proto = pb.ModelProto()
    for token, score, kind in zip(tokens, scores, types):
        proto.pieces.add(piece=token, score=score, type=kind)
    spec = proto.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = BYTE in types
    for name in ("unk", "bos", "eos", "pad"):  # sentencepiece finds bos/eos/pad/unk by piece name
        i = ids.get(name)
        setattr(spec, f"{name}_id", -1 if i is None else i)
        if i is not None:
            setattr(spec, f"{name}_piece", tokens[i])
    norm = proto.normalizer_spec
    norm.name, norm.add_dummy_prefix = "identity", bool(add_dummy_prefix)
    norm.remove_extra_whitespaces, norm.escape_whitespaces = False, True
    return proto.SerializeToString()


def _tokenizers_from_spm(model_bytes):
    """The `tokenizers` equivalent of one of our sentencepiece BPE/char models, for tokenizer.json.

    sentencepiece BPE merges the adjacent pair whose merged piece scores highest; `tokenizers` BPE applies merges by
    rank. Ranking every (left, right) split of every piece by that piece's score gives the same result (this is
    how transformers converts LLaMA's tokenizer.model too)."""
    from sentencepiece import sentencepiece_model_pb2 as pb  # needs protobuf
    proto = pb.ModelProto.FromString(model_bytes)
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    if spec.model_type not in (pb.TrainerSpec.BPE, pb.TrainerSpec.CHAR):
        raise NotImplementedError("tokenizer.json export supports sentencepiece BPE and char models only")
    if norm.add_dummy_prefix or norm.remove_extra_whitespaces or norm.name != "identity":
        raise NotImplementedError("tokenizer.json export needs identity normalisation without a dummy prefix "
                                  "(as train_tokenizer.py trains); this model still loads from tokenizer.model")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    score = {p.piece: p.score for p in proto.pieces if p.type == NORMAL}
    ranked = []
    for piece, s in score.items():
        for k in range(1, len(piece)):
            if piece[:k] in score and piece[k:] in score:
                ranked.append((-s, piece[:k], piece[k:]))
    ranked.sort(key=lambda r: r[0])  # stable: ties keep the split order
    unk = next(p.piece for p in proto.pieces if p.type == UNKNOWN)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[(a, b) for _, a, b in ranked], unk_token=unk,
                                fuse_unk=True, byte_fallback=spec.byte_fallback))
    hf.normalizer = normalizers.Replace(" ", "\u2581")
    hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    hf.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                           for p in proto.pieces if p.type in (CONTROL, UNKNOWN)])
    hf.add_tokens([AddedToken(p.piece, special=False, normalized=False)
                   for p in proto.pieces if p.type == USER_DEFINED])
    return hf
