"""The vocabulary: byte-level BPE trained with Hugging Face `tokenizers`, special tokens and chat rendering.

- Byte-level: every string (English, Korean, emoji, code, runs of whitespace) round-trips exactly, since the
  base alphabet is the 256 bytes and no normaliser touches the text.
- Digits are split into single tokens before BPE (as Llama and GPT-4-style tokenizers do), so the model sees
  "123" as 1, 2, 3 and can learn place-value arithmetic instead of memorising numerals.
- Special tokens: BOS, EOS, a pad token distinct from EOS (so padding can never be confused with the end of a
  text), and one token per chat role.

Chat layout (one layout, written twice: in `render` and as the Jinja `chat_template` that `transformers`'
`apply_chat_template` uses, and a test keeps them equal):

    <|bos|><|system|>You are terse.<|eos|><|user|>Hi<|eos|><|assistant|>Hello!<|eos|>
                                                                        ^^^^^^^^^^^^^ loss_mask = 1

The end of every turn is EOS, so a chat model stops where a base model stops. Only assistant content and the
EOS that closes each assistant turn are trained (the model must learn to stop, but never to write the user's
part).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from lmforge.errors import BadConfigError, BadFileError, UserError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {role: f"<|{role}|>" for role in ROLES}
SPECIAL_TOKENS = [BOS, EOS, PAD, *ROLE_TOKENS.values()]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _new_bpe() -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str] | list[Path], vocab_size: int, min_frequency: int = 2) -> "Tokenizer":
    """Train a byte-level BPE of `vocab_size` tokens (specials included) from an iterable of strings or a list
    of `Path`s to plain-text files."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise BadConfigError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + specials), got {vocab_size}")
    tok = _new_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    if isinstance(texts, list) and texts and all(isinstance(t, Path) for t in texts):
        tok.train([str(t) for t in texts], trainer)
    else:
        tok.train_from_iterator(texts, trainer)
    bos_id = tok.token_to_id(BOS)
    # `transformers` adds BOS to a plain encode (as Llama's tokenizer does); lmforge's own encode does not
    # unless asked, and chat rendering writes BOS itself.
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return Tokenizer(tok)


class Tokenizer:
    """lmforge's view of a `tokenizers.Tokenizer`: encode/decode, special ids, chat rendering, save/load."""

    def __init__(self, hf_tokenizer: HFTokenizer):
        self.hf = hf_tokenizer
        missing = [t for t in SPECIAL_TOKENS if hf_tokenizer.token_to_id(t) is None]
        if missing:
            raise BadFileError(f"tokenizer lacks the special tokens {missing}")
        self.bos_id = hf_tokenizer.token_to_id(BOS)
        self.eos_id = hf_tokenizer.token_to_id(EOS)
        self.pad_id = hf_tokenizer.token_to_id(PAD)
        self.role_ids = {role: hf_tokenizer.token_to_id(tok) for role, tok in ROLE_TOKENS.items()}
        # Whether the saved tokenizer_config.json carries the chat template (what `transformers` renders with);
        # chat training refuses a checkpoint without it, since other tools could not render its chats.
        self.has_chat_template = True

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    # -- chat -------------------------------------------------------------------------------------------

    def render(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """Messages -> (ids, loss_mask): 1 on assistant content and on the EOS that ends each assistant turn."""
        ids, loss_mask = [self.bos_id], [0]
        for i, message in enumerate(messages):
            role, content = check_message(message, i)
            trained = int(role == "assistant")
            content_ids = self.encode(content)
            ids += [self.role_ids[role], *content_ids, self.eos_id]
            loss_mask += [0] + [trained] * (len(content_ids) + 1)
        return ids, loss_mask

    def render_prompt(self, messages: list[dict]) -> list[int]:
        """The conversation so far followed by the assistant role token: what the model continues."""
        ids, _ = self.render(messages)
        return ids + [self.role_ids["assistant"]]

    # -- files ------------------------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """A hash of the vocabulary and merges: two tokenizers with the same fingerprint encode identically."""
        model = json.loads(self.hf.to_str())["model"]
        blob = json.dumps([model.get("vocab"), model.get("merges")], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def save(self, directory: str | Path, model_max_length: int | None = None) -> None:
        """Write tokenizer.json and tokenizer_config.json (with the chat template) into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(directory / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
            "additional_special_tokens": list(ROLE_TOKENS.values()),
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length or 1_000_000,
        }
        _write_json(directory / "tokenizer_config.json", config)
        _write_json(directory / "special_tokens_map.json", {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD})

    @classmethod
    def load(cls, directory: str | Path) -> "Tokenizer":
        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise BadFileError(f"{path}: no tokenizer file")
        try:
            tokenizer = cls(HFTokenizer.from_file(str(path)))
        except UserError:
            raise
        except Exception as e:  # tokenizers raises plain Exceptions for unparsable files
            raise BadFileError(f"{path}: not a readable tokenizer ({str(e).splitlines()[0]})") from None
        config = Path(directory) / "tokenizer_config.json"
        try:
            tokenizer.has_chat_template = bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))
        except (OSError, json.JSONDecodeError):
            tokenizer.has_chat_template = False
        return tokenizer


def check_message(message: dict, index: int) -> tuple[str, str]:
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise BadConfigError(f"message {index}: needs 'role' and 'content', got {message!r:.80}")
    role, content = message["role"], message["content"]
    if role not in ROLES:
        raise BadConfigError(f"message {index}: role must be one of {ROLES}, got {role!r}")
    if not isinstance(content, str):
        raise BadConfigError(f"message {index}: content must be a string")
    return role, content


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
