"""Recomposers: a reference image's caption + a modification -> a description of the target.

The middle step of CIReVL (Karthik et al., ICLR 2024, "Vision-by-Language for Training-Free
Compositional Image Retrieval", https://github.com/ExplainableML/Vision_by_Language): a
language model reads the caption and the user's instruction and writes what the target looks
like; retrieval then embeds that text. Three recomposers, one interface (`recompose(captions,
instructions) -> descriptions`):

- `ChatRecomposer`: an OpenAI-compatible chat endpoint (`POST {url}/chat/completions`: what
  vLLM, llama.cpp's server, Ollama and OpenAI serve), one request per query, with retries.
- `HFRecomposer`: a local Hugging Face causal LM (needs torch and the model's files).
- `TemplateRecomposer`: rules, no model: each "is <value>" / "has a <value> logo|tag|label"
  clause of the instruction replaces that attribute's value in the caption. The offline
  fallback and the SynthFashion-CIR baseline, not CIReVL.

The two language-model recomposers use CIReVL's protocol: the prompt, then "Image Content:
<caption>" and "Instruction: <instruction>" on their own lines; the answer's first line that
starts with "Edited Description:" is the description. `exact=True` (the default for FashionIQ in
`configs/cirevl.py`) does all of it as CIReVL's released code does: the prompt file byte for
byte (CIReVL's FashionIQ prompt ends with a newline, so its requests have a blank line before
"Image Content:"), CIReVL's chat settings (`max_tokens` 700, `stop` ["\n\n", "<|endoftext|>"],
60 tries) and its parsing (the text between the label and the next colon); `exact=False` keeps
ours (the file stripped, 128 tokens without stop sequences, the whole line after the label:
docs/composed_retrieval.md says why). The prompt is one file,
`e2_jax/evaluation/recompose_prompt.txt`, written for this project in CIReVL's format with fashion
examples; CIReVL's own FashionIQ prompt (`structural_modifier_prompt_fashion` in its
`src/prompts.py`), which the paper's numbers used, can be saved to a file and given as
`prompt_file` (docs/composed_retrieval.md).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from e2_jax.errors import ConfigError, UserError

PROMPT_FILE = Path(__file__).with_name("recompose_prompt.txt")
ANSWER = "Edited Description:"


class RecomposeError(UserError, RuntimeError):
    """A language model that cannot be reached or answers in a form we cannot read."""


CIREVL_STOP = ("\n\n", "<|endoftext|>")  # CIReVL's src/openai_api.py: stop=[...]


def load_prompt(path: str | Path | None = None, verbatim: bool = False) -> str:
    """The prompt file's text: stripped of white space at its ends, or as it is (`verbatim`:
    CIReVL's prompt string saved to a file, its final newline kept)."""
    path = Path(path) if path else PROMPT_FILE
    if not path.is_file():
        raise ConfigError(f"no prompt file {path}")
    text = path.read_bytes().decode("utf-8")
    return text if verbatim else text.strip()


def build_prompt(prompt: str, caption: str, instruction: str) -> str:
    """CIReVL's query: the prompt, the image content, the instruction, one per line."""
    return f"{prompt}\nImage Content: {caption}\nInstruction: {instruction}"


def parse_answer(answer: str, exact: bool = False) -> str | None:
    """The description in the first line that starts with "Edited Description:" (after white
    space), or None if no line does or it is empty. `exact`: as CIReVL reads it (`src/utils.py`,
    `line.split(':')[1].strip()` on `resp.split('\n')`): only the text up to the next colon;
    otherwise the whole rest of the line."""
    for line in answer.split("\n") if exact else answer.splitlines():
        if line.strip().startswith(ANSWER):
            text = line.split(":")[1] if exact else line.strip()[len(ANSWER):]
            return text.strip() or None
    return None


@dataclasses.dataclass
class Stats:
    """What a recomposer did: queries answered, and those that fell back to the instruction."""

    queries: int = 0
    fallbacks: int = 0
    examples: list[str] = dataclasses.field(default_factory=list)  # the first few fallbacks' answers

    def fallback(self, answer: str) -> None:
        self.fallbacks += 1
        if len(self.examples) < 5:
            self.examples.append(answer[:200])


class _LanguageModel:
    """The CIReVL protocol around `complete(prompt) -> answer`. An answer without an "Edited
    Description:" line falls back to the instruction itself, as CIReVL does (counted in
    `stats`), or is an error with `strict`."""

    def __init__(self, prompt_file: str | Path | None = None, strict: bool = False, exact: bool = False) -> None:
        self.prompt = load_prompt(prompt_file, verbatim=exact)
        self.strict, self.exact = strict, exact
        self.stop: list[str] = list(CIREVL_STOP if exact else ())  # the answer ends before the first
        self.stats = Stats()

    def complete(self, prompt: str) -> str:
        raise NotImplementedError

    def recompose(self, captions: Sequence[str], instructions: Sequence[str]) -> list[str]:
        out = []
        for caption, instruction in zip(captions, instructions, strict=True):
            answer = self.complete(build_prompt(self.prompt, caption, instruction))
            for stop in self.stop:  # (a server applies them too; a local model does not)
                answer = answer.split(stop)[0]
            self.stats.queries += 1
            description = parse_answer(answer, self.exact)
            if description is None:
                if self.strict:
                    raise RecomposeError(f"the language model's answer has no '{ANSWER}' line: {answer[:300]!r}")
                self.stats.fallback(answer)
                description = instruction
            out.append(description)
        return out


class ChatRecomposer(_LanguageModel):
    """An OpenAI-compatible chat endpoint. `url`: the API root (`http://127.0.0.1:8000/v1` for
    vLLM, `http://127.0.0.1:11434/v1` for Ollama, `http://127.0.0.1:8080/v1` for llama.cpp);
    `model`: the name it serves. Each query is one user message, greedy (temperature 0), with
    `max_tokens` and the `stop` sequences. The request body is the JSON CIReVL's OpenAI client
    sends (the same keys in the same order). Connection failures, timeouts, HTTP 429 and 5xx are
    retried `retries` times with an exponential backoff (at most `max_wait` seconds apart); any
    other HTTP error, or a response that is not a chat completion, is a `RecomposeError` naming
    the endpoint and quoting the response. `exact`: CIReVL's settings, where not given
    (`max_tokens` 700, `stop` `CIREVL_STOP`, 60 tries), its prompt and its parsing."""

    def __init__(self, url: str, model: str, *, api_key: str = "", timeout: float = 60.0, retries: int | None = None,
                 backoff: float = 1.0, max_wait: float = 60.0, max_tokens: int | None = None,
                 stop: Sequence[str] | None = None, prompt_file: str | Path | None = None, strict: bool = False,
                 exact: bool = False) -> None:
        super().__init__(prompt_file, strict, exact)
        retries = (59 if exact else 3) if retries is None else retries
        max_tokens = (700 if exact else 128) if max_tokens is None else max_tokens
        if stop is not None:
            self.stop = list(stop)
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"the chat endpoint {url!r} is not an http(s) URL (e.g. http://127.0.0.1:8000/v1)")
        self.endpoint = url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.retries, self.backoff, self.max_wait, self.max_tokens = retries, backoff, max_wait, max_tokens

    def body(self, prompt: str) -> bytes:
        """The request's JSON: CIReVL's keys in its order (openai 0.x sends the keyword arguments
        of `ChatCompletion.create` as given, less `timeout` and `request_timeout`)."""
        request = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                   "max_tokens": self.max_tokens, "temperature": 0}
        if self.stop:
            request["stop"] = self.stop
        return json.dumps(request).encode()

    def complete(self, prompt: str) -> str:
        body = self.body(prompt)
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), self.max_wait))
            request = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return self._content(response.read())
            except urllib.error.HTTPError as error:
                text = error.read().decode("utf-8", "replace")[:300]
                if error.code != 429 and error.code < 500:
                    raise RecomposeError(f"{self.endpoint} refused the request: HTTP {error.code} {text!r}") from None
                last = f"HTTP {error.code} {text!r}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                last = str(getattr(error, "reason", error))
        raise RecomposeError(f"{self.endpoint} did not answer after {self.retries + 1} tries (last: {last}); is the "
                             "server running, and is the URL its API root (e.g. http://127.0.0.1:8000/v1)?")

    def _content(self, raw: bytes) -> str:
        try:
            reply = json.loads(raw)
            content = reply["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise RecomposeError(f"{self.endpoint} answered with something other than a chat completion "
                                 f"(choices[0].message.content): {raw[:300]!r}") from None
        if not isinstance(content, str):
            raise RecomposeError(f"{self.endpoint}: the completion's content is not text: {raw[:300]!r}")
        return content


class HFRecomposer(_LanguageModel):
    """A local Hugging Face causal language model (`model`: a folder or a hub name already in
    the cache; needs torch), greedy decoding of `max_new_tokens`; with a chat template when the
    tokenizer has one."""

    def __init__(self, model: str, *, max_new_tokens: int = 64, prompt_file: str | Path | None = None,
                 strict: bool = False, exact: bool = False) -> None:
        super().__init__(prompt_file, strict, exact)
        try:
            import transformers  # optional: torch and the model's weights
        except ImportError as error:
            raise ConfigError(f"the Hugging Face recomposer needs transformers and torch ({error})") from None
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(model)
        self.max_new_tokens = max_new_tokens

    def complete(self, prompt: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                     return_tensors="pt")
        else:
            ids = self.tokenizer(prompt, return_tensors="pt").input_ids
        out = self.model.generate(ids, max_new_tokens=self.max_new_tokens, do_sample=False,
                                  pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


_CLAUSE = (re.compile(r"^(?:is|are) (?:an? )?(?P<value>.+?)$"),
           re.compile(r"^has (?:an? )?(?P<value>.+?) (?:logo|tag|label|print)$"))


class TemplateRecomposer:
    """Rules, no language model: `vocabulary` maps each attribute to its values (colours,
    garments, brands, ...). The instruction is split into clauses at " and "; a clause "is
    <value>", "is a <value>" or "has a <value> logo|tag|label|print" whose value belongs to an
    attribute replaces that attribute's value in the caption (case-insensitive, whole words), or
    is appended when the caption names none; any other clause is appended as it is (a query with
    one or more such clauses counts once in `stats.fallbacks`)."""

    def __init__(self, vocabulary: Mapping[str, Sequence[str]]) -> None:
        self.attribute = {value.lower(): (name, value) for name, values in vocabulary.items() for value in values}
        self.values = {name: sorted(values, key=len, reverse=True) for name, values in vocabulary.items()}
        self.stats = Stats()

    def recompose(self, captions: Sequence[str], instructions: Sequence[str]) -> list[str]:
        out = []
        for caption, instruction in zip(captions, instructions, strict=True):
            self.stats.queries += 1
            text, unread = caption.strip(), []
            for clause in (c.strip(" .,;") for c in re.split(r"\band\b", instruction)):
                text = self._apply(text, clause, unread)
            if unread:
                self.stats.fallback("; ".join(unread))
            out.append(text)
        return out

    def _apply(self, text: str, clause: str, unread: list[str]) -> str:
        for pattern in _CLAUSE:
            match = pattern.match(clause.lower())
            if match and match["value"] in self.attribute:
                name, value = self.attribute[match["value"]]
                for old in self.values[name]:
                    found = re.search(rf"(?<!\w){re.escape(old)}(?!\w)", text, flags=re.IGNORECASE)
                    if found:
                        return text[: found.start()] + value + text[found.end():]
                return f"{text}, {value}"
        if clause:
            unread.append(clause)
            return f"{text}, {clause}"
        return text
