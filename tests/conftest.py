"""Shared fixtures: offline environment, a tiny tokenizer built in code and tiny random Llama models."""

from __future__ import annotations

import os
import tempfile

# Nothing in the tests may reach a hub; HF caches point at a throwaway directory.
_HF_TMP = tempfile.mkdtemp(prefix="plmtool-hf-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", _HF_TMP)
os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(_HF_TMP, "datasets"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_TRAIN_TEXT = """The quick brown fox jumps over the lazy dog. A language model assigns probabilities to
sequences of words. Pruning removes weights from a network; sparse networks can be fast.
Speculative decoding drafts several tokens and verifies them with the target model in one pass.
Experts are trained on clusters of similar instructions and a router picks one for each query.
Alabama is a state in the southeastern region of the United States. Numbers: 0 1 2 3 4 5 6 7 8 9.
"""


def load_script(name: str):
    """A script of scripts/ (not a package) imported as a module, for testing its functions."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build_tiny_tokenizer(vocab_size: int = 256):
    """A byte-level BPE tokenizer trained in code (no files, no hub), with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_TRAIN_TEXT] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>", pad_token="<|im_end|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_llama(vocab_size: int, seed: int = 0, *, hidden_size: int = 32, family: str = "llama",
                     init_std: float | None = None, **overrides):
    """A tiny random decoder built in code (seeded, eval mode): the one builder of every test's model.

    hidden_size with an MLP twice as wide, 2 layers, 4 heads over 2 KV heads, 512 positions, token ids
    of the tiny tokenizer's specials; `overrides` set any other config field (intermediate_size,
    num_hidden_layers, max_position_embeddings, tie_word_embeddings, ...). `family="qwen3"` builds the
    same shape as Qwen3 (q/k norms), for code that must hold across families. `init_std` redraws every
    matrix from N(0, init_std): weights larger than the default init give peaked logits, so greedy
    comparisons do not hinge on near-ties.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    cfg = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False,
    )
    cfg.update(overrides)
    families = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
    config_cls, model_cls = families[family]
    if family == "qwen3":
        cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])  # Qwen3's default is 128
    torch.manual_seed(seed)
    model = model_cls(config_cls(**cfg))
    if init_std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, init_std)
    return model.eval()


def one_thread():
    """Generator body for an autouse fixture (`pytest.fixture(autouse=True)(one_thread)`, any scope):
    tiny-model tests are all small ops, where a second OpenMP thread only adds synchronisation (and
    stalls badly on a loaded machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama(tiny_tokenizer):
    return build_tiny_llama(len(tiny_tokenizer), hidden_size=64)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_llama, tiny_tokenizer):
    """The tiny model saved as a Hugging Face checkpoint: pass it as model.name_or_path."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded SmolLM2-135M (fp32, CPU)."""
    from types import SimpleNamespace

    from plmtool.models import load_model

    return load_model(SimpleNamespace(name_or_path="smollm2-135m", dtype="float32", device="cpu"))
