"""Where self-distillation's answers come from: the model in this process, or a serving engine.

Both backends answer a list of conversations (``chat``) and return, per conversation, an ``Answer``
or None when the prompt plus ``max_new_tokens`` does not fit the model's context.

* ``LocalBackend``: Hugging Face ``generate`` on a model in this process, batched with left padding,
  prompts rendered with the tokenizer's chat template (or the built-in one). It also continues plain
  documents (``complete``). ``generate`` costs about the same per step for 1 or 64 sequences on a
  large model, so large batches pay.
* ``ServerBackend``: an OpenAI-compatible HTTP server (``vllm serve``, SGLang, TGI) with the same
  weights, many requests in flight. The server applies the model's own chat template. Far faster for
  large datasets; plain documents are not supported (their prompt is cut by token count, which needs
  the tokenizer in this process).
"""

from __future__ import annotations

import http.client
import json
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from medusa_liger.inference.backbone import decode_attention, stop_token_ids
from medusa_liger.records import chat_prompt_ids, chat_template_for, text_prompt_ids

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Refused:
    """A conversation the backend will not answer, and why (its chat template rejects it): the record is
    dropped and listed, as one whose prompt does not fit."""

    reason: str


@dataclass(frozen=True)
class Answer:
    """One generation: its text, whether an end-of-sequence token ended it, how many tokens it has."""

    text: str
    stopped: bool  # False: cut at max_new_tokens
    new_tokens: int


class LocalBackend:
    """Batched left-padded ``generate`` with one model and tokenizer."""

    supports_text = True

    def __init__(self, model: nn.Module, tokenizer, settings) -> None:
        from transformers import GenerationConfig

        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        # At construction, before anything is written: a template that cannot be used found at the first
        # conversation would leave earlier blocks written under a setting the resume then refuses to change.
        self.template = chat_template_for(tokenizer, settings.chat_template, "--chat-template")
        self.device = next(model.parameters()).device
        self.eos = stop_token_ids(tokenizer, model)
        if not self.eos:
            raise ValueError("the tokenizer and the model name no end-of-sequence token to stop at")
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos[0]
        self.context = getattr(model.config, "max_position_embeddings", None)
        # Every option that shapes the text is set here: generate() fills unset ones from the
        # model's own generation config (an instruct model may ship sampling defaults).
        sample = settings.temperature > 0
        self.config = GenerationConfig(
            max_new_tokens=settings.max_new_tokens, do_sample=sample, num_beams=1,
            temperature=settings.temperature if sample else 1.0, top_p=settings.top_p if sample else 1.0,
            top_k=0 if sample else None, repetition_penalty=1.0, eos_token_id=self.eos, pad_token_id=self.pad,
        )

    def chat(self, conversations: Sequence[Messages]) -> list[Answer | Refused | None]:
        """The next assistant turn of each conversation (stripped of surrounding whitespace); Refused for
        one the chat template rejects (one record's roles must not stop the whole dataset)."""
        results: list[Answer | Refused | None] = [None] * len(conversations)
        prompts: dict[int, list[int]] = {}
        for i, messages in enumerate(conversations):
            try:
                prompts[i] = chat_prompt_ids(self.tokenizer, messages, self.template)
            except ValueError as error:
                results[i] = Refused(str(error))
        for i, a in zip(prompts, self._answer(list(prompts.values()), with_prompt=False)):
            results[i] = None if a is None else Answer(a.text.strip(), a.stopped, a.new_tokens)
        return results

    def complete(self, texts: Sequence[str]) -> list[Answer | None]:
        """Each document's first ``text_prompt_tokens`` tokens followed by the model's continuation."""
        limit = self.settings.text_prompt_tokens
        return self._answer([text_prompt_ids(self.tokenizer, t, limit) for t in texts], with_prompt=True)

    def fits(self, prompt: list[int]) -> bool:
        return self.context is None or len(prompt) + self.settings.max_new_tokens <= self.context

    def _answer(self, prompts: list[list[int]], with_prompt: bool) -> list[Answer | None]:
        answers: list[Answer | None] = [None] * len(prompts)
        # Similar lengths in one batch: less padding.
        order = sorted((i for i, p in enumerate(prompts) if self.fits(p)), key=lambda i: len(prompts[i]))
        size = self.settings.batch_size
        for start in range(0, len(order), size):
            batch = order[start : start + size]
            for i, (new_ids, stopped) in zip(batch, self._generate_or_split([prompts[i] for i in batch])):
                # A continued document is decoded whole: decoded apart, SentencePiece drops the space
                # where the two meet, and a cut inside a multi-byte character garbles both halves.
                text = self.tokenizer.decode(prompts[i] + new_ids if with_prompt else new_ids,
                                             skip_special_tokens=True)
                answers[i] = Answer(text, stopped, len(new_ids))
        return answers

    def _generate_or_split(self, prompts: list[list[int]]) -> list[tuple[list[int], bool]]:
        """``generate``; a batch that runs out of GPU memory (long prompts) is retried in halves."""
        try:
            return self.generate(prompts)
        except torch.OutOfMemoryError:
            if len(prompts) == 1:
                raise
        torch.cuda.empty_cache()  # outside the except block: the error's frames no longer pin the memory
        half = len(prompts) // 2
        return self._generate_or_split(prompts[:half]) + self._generate_or_split(prompts[half:])

    @torch.no_grad()
    def generate(self, prompts: list[list[int]]) -> list[tuple[list[int], bool]]:
        """(new token ids without the stop token, whether a stop token ended them) per prompt."""
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):  # left padding: every prompt ends at column width - 1
            input_ids[row, width - len(prompt):] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt):] = 1
        # generate() fills every option our config leaves unset from the model's own generation config
        # (no_repeat_ngram_size, suppress_tokens, min_p, bad_words_ids, ...): a blank one stands in for it.
        from transformers import GenerationConfig

        shipped = getattr(self.model, "generation_config", None)
        if shipped is not None:
            self.model.generation_config = GenerationConfig()
        try:
            with decode_attention():  # no cuDNN attention: it plans anew for every step's key length
                out = self.model.generate(input_ids=input_ids.to(self.device),
                                          attention_mask=attention_mask.to(self.device), generation_config=self.config)
        finally:
            if shipped is not None:
                self.model.generation_config = shipped
        results = []
        for row in out[:, width:].tolist():
            stop = next((j for j, token in enumerate(row) if token in self.eos), None)
            results.append((row if stop is None else row[:stop], stop is not None))
        return results


# Phrases of the errors servers give for a prompt that leaves no room for max_tokens: HTTP 400 (vLLM,
# SGLang) or 422 (TGI: "`inputs` tokens + `max_new_tokens` must be <= N", "must have less than N tokens").
CONTEXT_ERRORS = ("context length", "context window", "maximum context", "too long", "max_model_len",
                  "must be <=", "must have less than")
CONTEXT_ERROR_CODES = (400, 422)
# ... and for a conversation the model's chat template rejects (vLLM answers jinja's error with a 400).
# Not "template" alone: a server without any chat template says so for every record, which must stop
# the run, not drop them all.
TEMPLATE_ERRORS = ("must alternate", "role not supported", "roles must", "templateerror", "template error")
# Answers worth asking again (with backoff, or after the server's Retry-After): overload and time-outs.
RETRIED_CODES = (408, 429)


class ServerBackend:
    """Chat completions from an OpenAI-compatible server, ``concurrency`` requests in flight."""

    supports_text = False

    def __init__(self, url: str, settings, *, model: str | None = None, api_key: str | None = None,
                 concurrency: int = 64, timeout: float = 600.0, retries: int = 3) -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency must be an integer >= 1, got {concurrency!r}")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"server must be an http(s) URL such as http://localhost:8000/v1, got {url!r}")
        self.base = url.rstrip("/") if url.rstrip("/").endswith("/v1") else url.rstrip("/") + "/v1"
        self.settings, self.api_key, self.concurrency = settings, api_key, concurrency
        self.timeout, self.retries = timeout, retries
        self.model = model or self._served_model()

    def _request(self, path: str, body: dict[str, Any] | None = None,
                 stop: threading.Event | None = None) -> dict[str, Any]:
        """One JSON request; connection failures and 5xx answers are retried with backoff (not once
        ``stop`` is set: another request failed, or the run was interrupted)."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(self.retries + 1):
            if stop is not None and stop.is_set():
                raise ServerError(None, f"{self.base + path}: stopped (another request failed)")
            request = urllib.request.Request(self.base + path, data=data, headers=headers)
            wait = 2**attempt
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
                try:
                    return json.loads(raw)
                except ValueError:  # (an HTML page from a proxy, say)
                    raise ServerError(None, f"{self.base + path}: the reply is not JSON: "
                                            f"{raw[:300].decode('utf-8', 'replace')!r}") from None
            except urllib.error.HTTPError as error:
                detail = error.read().decode("utf-8", "replace")[:500]
                retried = error.code >= 500 or error.code in RETRIED_CODES
                if not retried or attempt == self.retries:
                    hint = (" (does the server need a key? pass --api-key or set OPENAI_API_KEY)"
                            if error.code in (401, 403) else "")
                    raise ServerError(error.code, f"{self.base + path}: HTTP {error.code}: {detail}{hint}",
                                      detail) from None
                wait = max(wait, _retry_after(error.headers.get("Retry-After")))
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as error:
                # (HTTPException: a reply cut short, IncompleteRead, RemoteDisconnected)
                if attempt == self.retries:
                    raise ServerError(None, f"{self.base + path}: {type(error).__name__}: {error}") from None
            time.sleep(wait)
        raise AssertionError("unreachable")

    def _served_model(self) -> str:
        models = self._request("/models").get("data") or []
        if not models:
            raise ValueError(f"{self.base}/models lists no model; pass the served model's name (--server-model)")
        return str(models[0]["id"])

    def _one(self, messages: Messages, stop: threading.Event | None = None) -> Answer | Refused | None:
        # The options the local backend pins are sent too: vLLM (by default) fills those a request leaves
        # out from the model's generation_config.json (an instruct model's repetition_penalty, top_k), which
        # changes even greedy text. (top_k -1: off, for vLLM and SGLang alike.)
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": self.settings.max_new_tokens,
                                "temperature": self.settings.temperature, "top_p": self.settings.top_p, "n": 1,
                                "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0}
        if self.settings.temperature > 0:
            body["seed"] = self.settings.seed
        try:
            reply = self._request("/chat/completions", body, stop)
        except ServerError as error:
            detail = error.detail.lower()  # (the server's message, not the URL)
            if error.code in CONTEXT_ERROR_CODES and any(p in detail for p in CONTEXT_ERRORS):
                return None
            if error.code in CONTEXT_ERROR_CODES and any(p in detail for p in TEMPLATE_ERRORS):
                return Refused(f"the server's chat template rejected this conversation: {error}")
            raise
        try:
            choice = reply["choices"][0]
            text = choice["message"]["content"] or ""
            tokens = int((reply.get("usage") or {}).get("completion_tokens") or 0)
            if not isinstance(text, str):
                raise TypeError
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            raise ServerError(None, f"{self.base}/chat/completions: unexpected reply {str(reply)[:300]}") from None
        return Answer(text.strip(), choice.get("finish_reason") != "length", tokens)

    def chat(self, conversations: Sequence[Messages]) -> list[Answer | Refused | None]:
        """The next assistant turn of each conversation, in order. The first request that fails (or an
        interrupt) ends the call at once: no request is sent or retried after it, and the threads still
        waiting on an answer are daemons (a pool's would hold the process until their requests end, up to
        the timeout for every retry)."""
        conversations = list(conversations)
        results: list[Answer | Refused | None] = [None] * len(conversations)
        todo: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(len(conversations)):
            todo.put(i)
        done: queue.SimpleQueue[tuple[int, Any, BaseException | None]] = queue.SimpleQueue()
        stop = threading.Event()

        def work() -> None:
            while not stop.is_set():
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    done.put((i, self._one(conversations[i], stop), None))
                except BaseException as error:  # noqa: BLE001 - handed to the calling thread
                    stop.set()  # at once: this thread would otherwise take (and send) the next request first
                    done.put((i, None, error))

        for _ in range(min(self.concurrency, len(conversations))):
            threading.Thread(target=work, daemon=True).start()
        try:
            for _ in conversations:
                i, answer, error = done.get()
                if error is not None:
                    raise error
                results[i] = answer
        finally:  # on an error or an interrupt, send no more requests
            stop.set()
        return results

    def complete(self, texts: Sequence[str]) -> list[Answer | None]:
        raise ValueError("text records need the model in this process (--backbone), not --server")


def _retry_after(value: str | None, most: float = 60.0) -> float:
    """Seconds a ``Retry-After`` header asks to wait (at most ``most``; 0 when absent or a date)."""
    try:
        return min(most, max(0.0, float(value))) if value else 0.0
    except ValueError:
        return 0.0


class ServerError(ValueError):
    """A request the server refused or could not answer (``code``: the HTTP status, if any)."""

    def __init__(self, code: int | None, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.code, self.detail = code, detail  # detail: the server's answer
