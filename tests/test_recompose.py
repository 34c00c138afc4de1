"""Recomposers: the chat-endpoint one against a real HTTP server on 127.0.0.1, and the rules."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from e2_jax.evaluation import recompose
from e2_jax.evaluation.recompose import ChatRecomposer, RecomposeError, TemplateRecomposer


class _Server:
    """An OpenAI-compatible endpoint whose replies follow a script: each entry is (status,
    body bytes, delay seconds); the last one repeats. Records every request (its raw body too).
    As OpenAI's and vLLM's servers do, a completion ends before the first of the request's
    `stop` sequences."""

    def __init__(self, script):
        self.script, self.requests = list(script), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers["Content-Length"])
                raw = self.rfile.read(length)
                request = json.loads(raw)
                outer.requests.append({"path": self.path, "headers": dict(self.headers), "body": request, "raw": raw})
                status, body, delay = outer.script[min(len(outer.requests), len(outer.script)) - 1]
                if status == 200 and request.get("stop"):
                    reply = json.loads(body)
                    for stop in request["stop"]:
                        reply["choices"][0]["message"]["content"] = reply["choices"][0]["message"]["content"].split(
                            stop)[0]
                    body = json.dumps(reply).encode()
                time.sleep(delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _completion(text: str) -> bytes:
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()


@pytest.fixture
def server(request):
    made = []

    def make(*script):
        made.append(_Server(script))
        return made[-1]

    yield make
    for s in made:
        s.close()


def test_the_chat_recomposer_sends_cirevls_query_and_reads_the_answer(server, tmp_path):
    s = server((200, _completion("Sure.\nEdited Description: a blue top with no logo\nInstruction: x"), 0))
    chat = ChatRecomposer(s.url + "/", "qwen2.5-7b-instruct", api_key="secret")
    got = chat.recompose(["a red top with a logo"], ["is blue and has no logo"])
    assert got == ["a blue top with no logo"]
    (sent,) = s.requests
    assert sent["path"] == "/v1/chat/completions" and sent["headers"]["Authorization"] == "Bearer secret"
    body = sent["body"]
    assert body["model"] == "qwen2.5-7b-instruct" and body["temperature"] == 0
    prompt = recompose.load_prompt()
    assert body["messages"] == [{"role": "user", "content": f"{prompt}\nImage Content: a red top with a logo\n"
                                                             "Instruction: is blue and has no logo"}]
    assert "Edited Description:" in prompt and prompt == recompose.PROMPT_FILE.read_text().strip()
    (tmp_path / "theirs.txt").write_text("Their prompt.\n")
    other = ChatRecomposer(s.url, "m", prompt_file=tmp_path / "theirs.txt")
    other.recompose(["c"], ["i"])
    assert s.requests[-1]["body"]["messages"][0]["content"] == "Their prompt.\nImage Content: c\nInstruction: i"


def test_busy_or_slow_servers_are_retried_then_named(server):
    s = server((503, b'{"error": "loading"}', 0), (429, b"{}", 0), (200, _completion("Edited Description: ok"), 0))
    assert ChatRecomposer(s.url, "m", retries=2, backoff=0.01).recompose(["c"], ["i"]) == ["ok"]
    assert len(s.requests) == 3
    slow = server((200, _completion("Edited Description: late"), 1.0))
    start = time.perf_counter()
    with pytest.raises(RecomposeError, match=r"did not answer after 2 tries .*is the server running"):
        ChatRecomposer(slow.url, "m", timeout=0.2, retries=1, backoff=0.01).recompose(["c"], ["i"])
    assert time.perf_counter() - start < 1.5 and len(slow.requests) == 2
    with pytest.raises(RecomposeError, match="did not answer"):
        ChatRecomposer("http://127.0.0.1:9/v1", "m", retries=0).recompose(["c"], ["i"])  # nothing listens


def test_malformed_replies_and_refusals_are_clear_errors(server):
    for body in (b"<html>gateway</html>", b'{"choices": []}', b'{"choices": [{"message": {"content": 3}}]}'):
        s = server((200, body, 0))
        with pytest.raises(RecomposeError, match=r"/v1/chat/completions"):
            ChatRecomposer(s.url, "m", retries=3, backoff=0.01).recompose(["c"], ["i"])
        assert len(s.requests) == 1  # not retried: the server answered
    refused = server((404, b'{"error": "model m not found"}', 0))
    with pytest.raises(RecomposeError, match=r"refused the request: HTTP 404 .*model m not found"):
        ChatRecomposer(refused.url, "m", backoff=0.01).recompose(["c"], ["i"])
    assert len(refused.requests) == 1
    # An answer without the "Edited Description:" line: CIReVL falls back to the instruction.
    chatty = server((200, _completion("I think the target is blue."), 0))
    lenient = ChatRecomposer(chatty.url, "m")
    assert lenient.recompose(["a red top"], ["is blue"]) == ["is blue"]
    assert lenient.stats.fallbacks == 1 and lenient.stats.examples == ["I think the target is blue."]
    with pytest.raises(RecomposeError, match="has no 'Edited Description:' line"):
        ChatRecomposer(chatty.url, "m", strict=True).recompose(["a red top"], ["is blue"])
    with pytest.raises(ValueError, match="not an http"):
        ChatRecomposer("127.0.0.1:8000", "m")


def test_the_template_recomposer_applies_attribute_edits():
    rules = TemplateRecomposer({"colour": ["red", "blue", "navy"], "garment": ["top", "t-shirt", "dress"],
                                "brand": ["Maison Kobo", "Studio Arden"], "season": ["SS2017", "FW2016"]})
    got = rules.recompose(
        ["a red top by Studio Arden", "Red T-shirt", "a navy dress", "a blue top"],
        ["is blue and has a Maison Kobo logo", "is a dress", "has an SS2017 tag and is darker", "is a t-shirt."])
    assert got == ["a blue top by Maison Kobo", "Red dress", "a navy dress, SS2017, is darker", "a blue t-shirt"]
    assert rules.stats.queries == 4 and rules.stats.fallbacks == 1  # "is darker": no rule


def test_the_hugging_face_recomposer_runs_a_local_causal_lm(tmp_path):
    """A random two-layer GPT-2 with a byte-level tokenizer written here (no download): the
    recomposer prompts it, decodes greedily and, as its words are noise, falls back to the
    instruction, as CIReVL does."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    byte_level = Tokenizer(models.BPE(vocab, []))
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte_level.decoder = decoders.ByteLevel()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=byte_level, eos_token="<|endoftext|>")
    tokenizer.save_pretrained(tmp_path)
    config = transformers.GPT2Config(vocab_size=len(vocab), n_positions=4096, n_embd=16, n_layer=2, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    lm = recompose.HFRecomposer(str(tmp_path), max_new_tokens=5)
    answer = lm.complete(recompose.build_prompt(lm.prompt, "a red top", "is blue"))
    assert isinstance(answer, str) and len(answer.encode("utf-8")) <= 5 * 4
    assert lm.recompose(["a red top"], ["is blue"]) == ["is blue"] and lm.stats.fallbacks == 1


def cirevl_request_body(base_prompt: str, img_caption: str, instruction: str, engine: str) -> bytes:
    """The body CIReVL's released code POSTs for one query, transcribed from its source
    (github.com/ExplainableML/Vision_by_Language at a8ba813) and the OpenAI client it calls
    (openai-python 0.28, the `openai.ChatCompletion` API it was written for)."""
    # src/utils.py, generate_predictions, lines 178-180:
    final_prompt = base_prompt + '\n' + "Image Content: " + img_caption
    final_prompt = final_prompt + '\n' + 'Instruction: ' + instruction
    # src/openai_api.py, openai_completion, lines 12-25 (its defaults: max_tokens=700, temperature=0):
    params = dict(model=engine, messages=[{"role": "user", "content": final_prompt}], max_tokens=700, timeout=10,
                  request_timeout=10, temperature=0, stop=["\n\n", "<|endoftext|>"])
    # openai/api_resources/chat_completion.py, ChatCompletion.create: `timeout = kwargs.pop("timeout", None)`
    params.pop("timeout")
    # openai/api_resources/abstract/engine_api_resource.py, __prepare_create_request:
    # `request_timeout = params.pop("request_timeout", None)`; the rest are the body
    params.pop("request_timeout")
    # openai/api_requestor.py, request_raw (post): `data = json.dumps(params).encode()`
    return json.dumps(params).encode()


def cirevl_parse(resp: str, instruction: str) -> str:
    """CIReVL's reading of an answer (src/utils.py, generate_predictions, lines 184-197)."""
    resp = resp.split('\n')
    for line in resp:
        if line.strip().startswith('Edited Description:'):
            description = line.split(':')[1].strip()
            return instruction if description == "" else description
    return instruction


def test_exact_sends_cirevls_request_byte_for_byte_and_reads_answers_as_it_does(server, tmp_path):
    """A prompt saved from a Python string that ends with a newline, as CIReVL's
    `structural_modifier_prompt_fashion` does (its text is not copied here), sent with
    `exact`: the body equals the one CIReVL's code builds, byte for byte; the answers are read
    as CIReVL reads them, after the server's stop sequences."""
    prompt = 'I have an image.\nBegin with "Edited Description:". Examples:\n\nImage Content: a top\n' \
             'Instruction: is red\nEdited Description: a red top \u2013 plain\n'
    (tmp_path / "cirevl_fashion.txt").write_text(prompt, encoding="utf-8")
    caption, instruction = "a blue dress with long sleeves", "is shorter and  is black"
    answers = ["Edited Description: a short black dress: long sleeves\nmore",  # a second colon
               "Sure!\n\nEdited Description: a short black dress",  # cut at the blank line
               "Edited Description:   \n", "  Edited Description: a dress"]
    s = server(*[(200, _completion(a), 0) for a in answers])
    exact = ChatRecomposer(s.url, "gpt-3.5-turbo", prompt_file=tmp_path / "cirevl_fashion.txt", exact=True)
    got = exact.recompose([caption] * 4, [instruction] * 4)
    for sent in s.requests:
        assert sent["raw"] == cirevl_request_body(prompt, caption, instruction, "gpt-3.5-turbo")
    assert "\n\nImage Content: a blue dress" in s.requests[0]["body"]["messages"][0]["content"]
    assert got == [cirevl_parse(a.split("\n\n")[0], instruction) for a in answers]
    assert got == ["a short black dress", instruction, instruction, "a dress"] and exact.stats.fallbacks == 2
    assert (exact.max_tokens, exact.retries) == (700, 59)
    ours = server(*[(200, _completion(a), 0) for a in answers])
    lenient = ChatRecomposer(ours.url, "gpt-3.5-turbo", prompt_file=tmp_path / "cirevl_fashion.txt")
    assert lenient.recompose([caption] * 4, [instruction] * 4) == [
        "a short black dress: long sleeves", "a short black dress", instruction, "a dress"]
    body = ours.requests[0]["body"]
    assert body["max_tokens"] == 128 and "stop" not in body
    assert body["messages"][0]["content"].startswith(prompt.strip() + "\nImage Content:")


def test_the_colon_parse():
    answer = "Edited Description: a red dress: blue"
    assert recompose.parse_answer(answer, exact=True) == "a red dress" == cirevl_parse(answer, "i")
    assert recompose.parse_answer(answer) == "a red dress: blue"
    assert recompose.parse_answer("no label here", exact=True) is None
